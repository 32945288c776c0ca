"""Wall time of a head-only experiment vs. a full re-run from the crop stage on, with DVC.

In a temporary git copy of the repository (the files `git ls-files -co --exclude-standard`
lists, less anything inside a dvc.yaml output, as a clone would have them), with the default
params.yaml except train.epochs=--epochs (edited before the first commit):

  warm-up : `dvc repro` (untimed; creates every output), then a commit of the results;
  (a)     : `dvc exp run -S train.lr=0.0005` -- only train and evaluate should run, on the
            cached features;
  then the workspace is put back to the committed baseline (git reset --hard, dvc checkout);
  (b)     : `dvc repro --force --downstream crop` -- crop and everything after it re-runs.

Prints both wall times, their ratio and the stages each ran ("Running stage" lines).
The stages import agegender from the copy's src (PYTHONPATH); MLFLOW_*/DVC_* variables are
stripped as in tests/test_pipeline.py. Run from anywhere with the venv active:

    python bench/sweep.py [--epochs 3] [--keep]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(args, cwd, env, log):
    started = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    out = result.stdout + result.stderr
    with open(log, "a") as file:
        file.write(f"$ {' '.join(args)}  # {seconds:.1f} s, rc {result.returncode}\n{out}\n")
    if result.returncode:
        sys.exit(f"{' '.join(args)} failed (rc {result.returncode}), log: {log}\n{out[-3000:]}")
    return out, seconds


def stages_run(out):
    return re.findall(r"Running stage '([^']+)'", out)


def copy_repo(target):
    """The project's files as a clone has them: outputs of dvc.yaml stages are left out."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    outs = []
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("outs", []) + stage.get("metrics", []):
            out = next(iter(entry)) if isinstance(entry, dict) else entry
            if out.startswith("data/"):  # data outputs; small metric files stay as git has them
                outs.append(out.rstrip("/"))
    for name in listed:
        if (
            any(name == out or name.startswith(out + "/") for out in outs)
            or not (REPO / name).is_file()
        ):
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()

    temp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    repo, log = temp / "repo", temp / "dvc.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        GIT_AUTHOR_NAME="b",
        GIT_AUTHOR_EMAIL="b@b",
        GIT_COMMITTER_NAME="b",
        GIT_COMMITTER_EMAIL="b@b",
        PATH=f"{BIN}:{env.get('PATH', '')}",
        PYTHONPATH=str(repo / "src"),
    )
    finished = False
    try:
        copy_repo(repo)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["train"]["epochs"] = args.epochs
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for command in (
            ["git", "init", "-q"],
            ["git", "add", "-A"],
            ["git", "commit", "-qm", "bench baseline"],
        ):
            run(command, repo, env, log)
        print(f"copy in {repo}; log {log}; train.epochs={args.epochs}", flush=True)

        out, warmup = run(["dvc", "repro"], repo, env, log)
        print(f"warm-up dvc repro: {warmup:.1f} s, ran {stages_run(out)}", flush=True)
        run(["git", "add", "-A"], repo, env, log)
        run(["git", "commit", "-qm", "baseline outputs"], repo, env, log)

        experiment = ["dvc", "exp", "run", "-S", "train.lr=0.0005"]
        out_a, head_only = run(experiment, repo, env, log)
        print(f"(a) done: {head_only:.1f} s", flush=True)
        run(["git", "reset", "--hard", "-q"], repo, env, log)
        run(["dvc", "checkout", "--force"], repo, env, log)
        full = ["dvc", "repro", "--force", "--downstream", "crop"]
        out_b, from_crop = run(full, repo, env, log)

        print(f"\n{'run':<48}{'wall s':>9}  stages run")
        print(
            f"{'(a) ' + ' '.join(experiment):<48}{head_only:>9.1f}  {', '.join(stages_run(out_a))}"
        )
        print(f"{'(b) ' + ' '.join(full):<48}{from_crop:>9.1f}  {', '.join(stages_run(out_b))}")
        print(
            f"ratio (b)/(a): {from_crop / head_only:.2f}x  "
            f"(warm-up dvc repro, all stages: {warmup:.1f} s)"
        )
        finished = True
    finally:
        if args.keep or not finished:  # a failed run keeps its copy and log
            print(f"kept {temp}")
        else:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
