"""What every part agrees on: params, pipeline paths, labels, errors, tracking, safe writes and
the skeleton every stage runs in. Imports nothing else of the package."""
