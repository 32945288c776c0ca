"""Loss choices for the two heads, each switchable in params so a sweep can compare them.

- cross_entropy: the reference design's 101-way softmax cross-entropy.
- mean_variance: cross-entropy plus the squared error of the expected age and the variance of
  the predicted distribution (Pan et al., CVPR 2018), so the expected value is trained too.
- dldl: KL divergence to a Gaussian label distribution around the true age plus the L1 error
  of the expected age (DLDL-v2, Gao et al., IJCAI 2018).
Registered as Keras objects, so a saved model loads with its training configuration.
"""

import keras
from keras import ops

MEAN_WEIGHT, VARIANCE_WEIGHT = 0.2, 0.05
DLDL_SIGMA, DLDL_L1_WEIGHT = 2.0, 1.0


@keras.saving.register_keras_serializable(package="agegender")
class HeadLoss(keras.losses.Loss):
    def __init__(self, kind="cross_entropy", label_smoothing=0.0, name=None, **kwargs):
        super().__init__(name=name or kind, **kwargs)
        self.kind, self.label_smoothing = kind, label_smoothing

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        cross_entropy = keras.losses.categorical_crossentropy(
            y_true, y_pred, label_smoothing=self.label_smoothing
        )
        if self.kind == "cross_entropy":
            return cross_entropy
        ages = ops.arange(y_pred.shape[-1], dtype="float32")
        true_age = ops.sum(y_true * ages, axis=-1)
        mean = ops.sum(y_pred * ages, axis=-1)
        if self.kind == "mean_variance":
            variance = ops.sum(y_pred * ops.square(ages - mean[:, None]), axis=-1)
            return (
                cross_entropy
                + MEAN_WEIGHT * ops.square(mean - true_age) / 2
                + VARIANCE_WEIGHT * variance
            )
        gaussian = ops.exp(-ops.square(ages - true_age[:, None]) / (2 * DLDL_SIGMA**2))
        target = gaussian / ops.sum(gaussian, axis=-1, keepdims=True)
        return keras.losses.kl_divergence(target, y_pred) + DLDL_L1_WEIGHT * ops.abs(
            mean - true_age
        )

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="agegender")
def expected_age_error(y_true, y_pred):
    """The absolute error of the expected age, in years: what a model is judged on, and, unlike
    the losses, comparable across age losses and models (a peaked answer costs dldl's KL term
    more than a broad one with the same mean)."""
    ages = ops.arange(y_pred.shape[-1], dtype="float32")
    return ops.abs(
        ops.sum(ops.cast(y_pred, "float32") * ages, axis=-1) - ops.sum(y_true * ages, axis=-1)
    )


def age_mae():
    return keras.metrics.MeanMetricWrapper(expected_age_error, name="mae")
