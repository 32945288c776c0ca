"""The pipeline at dataset scale: seconds, images/s, peak memory and disk per stage for N records.

Archive: a plain .tar in the wiki_crop layout (`wiki_crop/wiki.mat`, `wiki_crop/NN/<id>.jpg`,
like the official wiki_crop.tar), written member by member, so memory stays bounded:
  - wiki.mat is the first --records records of the real file (--mat, default
    ../shared/data/imdb-wiki/wiki.mat), every field kept, so filter drops what it drops on
    the real data (38,138 kept of all 62,328; about 60% of any N);
  - one JPEG per record at the record's full_path (also for records filter drops: extraction
    pays for them as it does on the real archive). The faces are the bundled sample's 2,913
    (data/sample/wiki_crop_sample.tar.gz, 64 px), cycled over the records and upscaled
    (bicubic, JPEG quality 90) to the size the real crop has: the face box of wiki.mat grown
    by 40% on each side (1.8 x the box; 258 px on average, as real wiki_crop faces are
    about 250 px), and where no face was found the box itself, which is the whole photo
    (a 1x1 placeholder for some). --image-size S writes every image S x S instead.

Run: per --rev (default HEAD; repeat it to time revisions side by side, `worktree` for the
uncommitted working tree) a scratch git clone at that revision, with params.yaml set to
data.dataset=wiki_crop, data.url=<the archive> (a local path, which download_data extracts in
place without copying), train.epochs=--epochs and the --set key=value overrides. Each stage
runs alone as `dvc repro -s <stage>`, in dvc.yaml order, so DVC's own cost (hashing the
outputs into .dvc/cache, the lock) counts, as users pay it. MLflow uses its default, the
sqlite file in the scratch repository (created, a few seconds, by the first stage). Per stage:
  seconds   : wall time of `dvc repro -s <stage>`; cpu s: user + system of its process tree;
  images    : what the stage handled, from its metrics file: download_data the files
              extracted less the .mat, filter the records read, crop the records it cut (or
              skipped), split the images split, features the images through the backbone
              (mirrors included), train train images x epochs run, evaluate the test images;
              none for the other stages; images/s = images / seconds;
  tree MiB  : peak of the sum of RSS over the process tree (dvc, the stage, its workers),
              sampled every 0.1 s; shared pages count once per process, so it overstates;
  max MiB   : os.wait4's ru_maxrss, the largest single process of the tree;
  disk MB   : after the stage, allocated blocks (10^6 bytes) of the archive, data/raw (the
              extracted tree), .dvc/cache, data/crops, data/features, and total: all five
              with a file counted once, however many of them link to it (DVC may link its
              cache into the workspace; then raw and cache each show the same files).
The scratch directory is removed unless --keep (or a stage failed). From the repository
root with the venv active:

    python bench/scale.py --records 3000 [--epochs 2] [--set model.backbone=vgg16 ...]
        [--rev A --rev B] [--out scale.json] [--archive PATH] [--workdir DIR] [--keep]
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import scipy.io
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_MAT = REPO.parent / "shared" / "data" / "imdb-wiki" / "wiki.mat"
SAMPLE = REPO / "data" / "sample" / "wiki_crop_sample.tar.gz"
MARGIN = 0.4  # wiki_crop's faces carry 40% of the face box on each side
QUALITY = 90
SAMPLE_SECONDS = 0.1
MIB = 1 << 20
DISK = {
    "archive": None,  # None: the archive itself, which lives outside the clone
    "raw": "data/raw",
    "cache": ".dvc/cache",
    "crops": "data/crops",
    "features": "data/features",
}


# ---- the archive ----------------------------------------------------------------------


def first_records(mat_path, count):
    """The first `count` records of wiki.mat, every field, as 1 x count arrays."""
    wiki = scipy.io.loadmat(mat_path)["wiki"][0, 0]
    total = wiki["full_path"].shape[1]
    if count > total:
        sys.exit(f"--records {count}: {mat_path} holds only {total} records")
    return {field: wiki[field][:, :count] for field in wiki.dtype.names}


def mat_bytes(fields):
    """The records as wiki.mat holds them: one struct `wiki` of 1 x N fields."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"wiki": fields}, format="5", do_compression=True)
    return buffer.getvalue()


def sample_faces(archive=SAMPLE):
    """The bundled faces' JPEG bytes (9 MB in all), in the archive's (sorted) order."""
    with tarfile.open(archive) as tar:
        return [tar.extractfile(m).read() for m in tar if m.isfile() and m.name.endswith(".jpg")]


def crop_size(location, face_score, fixed):
    """The real crop's size: the face box plus 40% on each side; the box as it is where no
    face was found (then it is the whole photo)."""
    values = np.ravel(np.asarray(location, dtype=float))
    if fixed or values.size != 4:
        return (fixed or 250,) * 2
    grow = 1 + 2 * MARGIN if np.isfinite(face_score) else 1
    width, height = values[2] - values[0] + 1, values[3] - values[1] + 1
    return max(1, round(width * grow)), max(1, round(height * grow))


def face_jpeg(face, size):
    with Image.open(io.BytesIO(face)) as image:
        upscaled = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    upscaled.save(out, format="JPEG", quality=QUALITY)
    return out.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_archive(path, mat_path, count, fixed_size):
    """Stream the archive to `path` one member at a time, each image encoded as it is added."""
    fields = first_records(mat_path, count)
    faces = sample_faces()
    partial = path.with_suffix(".partial")
    with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "wiki_crop/wiki.mat", mat_bytes(fields))
        for i in range(count):
            size = crop_size(fields["face_location"][0, i], fields["face_score"][0, i], fixed_size)
            name = str(np.ravel(fields["full_path"][0, i])[0])
            add(tar, f"wiki_crop/{name}", face_jpeg(faces[i % len(faces)], size))
    os.replace(partial, path)


def archive_path(args, workdir):
    return Path(args.archive).resolve() if args.archive else workdir / "wiki_crop.tar"


def build_archive(args, path):
    """The archive at `path`, reused when its note says it was built alike (--archive); the
    seconds it took to build, None when reused."""
    note = {"records": args.records, "mat": str(args.mat), "image_size": args.image_size}
    note_path = path.with_name(path.name + ".json")
    if path.is_file() and note_path.is_file() and json.loads(note_path.read_text()) == note:
        print(f"archive {path}: reused ({note_path} matches)", flush=True)
        return None
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_archive(path, args.mat, args.records, args.image_size)
    note_path.write_text(json.dumps(note))
    seconds = round(time.perf_counter() - started, 1)
    print(
        f"archive {path}: {args.records} images, {path.stat().st_size / 1e6:.0f} MB, "
        f"built in {seconds:.0f} s",
        flush=True,
    )
    return seconds


# ---- the scratch repository -------------------------------------------------------------


def git(*args, cwd=REPO):
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


def clone_at(rev, target, env):
    """A scratch git repository at `rev`, or of the working tree's files (`worktree`)."""
    if rev == "worktree":
        for name in git("ls-files", "-co", "--exclude-standard").splitlines():
            if (REPO / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, target / name)
        for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "worktree"]):
            subprocess.run(["git", *command], cwd=target, env=env, check=True)
        return "worktree"
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"--rev {rev}: not a revision of {REPO}")
    git("clone", "-q", "--no-checkout", str(REPO), str(target))
    git("checkout", "-q", "--detach", commit, cwd=target)
    return commit[:10]


def set_key(params, key, value):
    """One dotted key; a key params.yaml does not have is a typo, not a new setting."""
    *sections, last = key.split(".")
    node = params
    for section in sections:
        node = node.get(section) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        sys.exit(f"--set {key}: params.yaml has no such key")
    node[last] = value


def configure(repo, settings):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in settings.items():
        set_key(params, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def environment(repo):
    """No MLflow or DVC variables of ours: the scratch repository's defaults apply."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        GIT_AUTHOR_NAME="b",
        GIT_AUTHOR_EMAIL="b@b",
        GIT_COMMITTER_NAME="b",
        GIT_COMMITTER_EMAIL="b@b",
        PATH=f"{BIN}:{env.get('PATH', '')}",
        PYTHONPATH=str(repo / "src"),  # the revision's code, not the venv's editable install
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


# ---- measuring --------------------------------------------------------------------------


def tree_rss(root):
    """Bytes resident over a process and all its descendants, now."""
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def watched(args, cwd, env, log):
    """Run `args`; return (exit code, seconds, peak tree RSS, wait4's rusage)."""
    started = time.perf_counter()
    with open(log, "ab") as out:
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        root, peak = psutil.Process(process.pid), 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(root))
            time.sleep(SAMPLE_SECONDS)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return process.returncode, time.perf_counter() - started, peak, usage


def allocated(path):
    """{(device, inode): allocated bytes} of a file or of every file in a tree."""
    path = Path(path)
    if path.is_file():
        info = path.stat()
        return {(info.st_dev, info.st_ino): info.st_blocks * 512}
    blocks = {}
    for folder, _, files in os.walk(path):
        for name in files:
            info = os.lstat(os.path.join(folder, name))
            blocks[(info.st_dev, info.st_ino)] = info.st_blocks * 512
    return blocks


def disk_used(repo, archive):
    """Bytes on disk per tree of DISK, and of all of them together, where a file that DVC
    links into both the workspace and its cache counts once."""
    trees = {key: allocated(archive if path is None else repo / path) for key, path in DISK.items()}
    used = {key: sum(blocks.values()) for key, blocks in trees.items()}
    used["total"] = sum({k: v for blocks in trees.values() for k, v in blocks.items()}.values())
    return used


def metric(repo, name, *keys):
    try:
        value = json.loads((repo / "metrics" / f"{name}.json").read_text())
        for key in keys:
            value = value[key]
        return value
    except (OSError, ValueError, KeyError, TypeError):
        return None


def images_of(stage, repo):
    """The images (records) a stage handled, from the metrics file it wrote."""
    if stage == "download_data":
        files = metric(repo, "download", "files")
        return None if files is None else files - 1  # the .mat
    if stage == "split":
        parts = metric(repo, "split") or {}
        return sum(part.get("images", 0) for part in parts.values()) or None
    if stage == "train":
        images, epochs = metric(repo, "train", "train_images"), metric(repo, "train", "epochs_run")
        return None if images is None or epochs is None else images * epochs
    source = {
        "filter": ("filter", "total"),
        "crop": ("crop", "input"),
        "features": ("features", "images"),
        "evaluate": ("evaluate", "test_images"),
    }.get(stage)
    return metric(repo, *source) if source else None


def stage_row(stage, repo, archive, code, seconds, peak, usage):
    images = images_of(stage, repo) if code == 0 else None
    disk = disk_used(repo, archive)
    return {
        "stage": stage,
        "rc": code,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "images": images,
        "images_per_second": round(images / seconds, 1) if images else None,
        "tree_rss_mib": round(peak / MIB),
        "max_rss_mib": round(usage.ru_maxrss / 1024),  # KiB on Linux
        **{f"disk_{key}_mb": round(size / 1e6, 1) for key, size in disk.items()},
    }


def prepare_revision(index, rev, workdir, archive, settings):
    """A clone of `rev` with its params set; (repo, env, label). Before the archive is
    built, so a --set typo fails at once."""
    repo = workdir / f"repo-{index}-{rev.replace('/', '_')}"
    env = environment(repo)
    repo.mkdir(parents=True)
    label = clone_at(rev, repo, env)
    configure(repo, {**settings, "data.url": str(archive)})
    return repo, env, label


def run_stages(repo, env, label, archive):
    """Every stage of dvc.yaml in order, one `dvc repro -s` each, until one fails; the rows,
    and whether all succeeded."""
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    log = repo.parent / f"dvc-{repo.name}.log"
    print(f"rev {label} in {repo}; log {log}", flush=True)
    rows = []
    for stage in stages:
        code, seconds, peak, usage = watched(["dvc", "repro", "-s", stage], repo, env, log)
        rows.append({"rev": label, **stage_row(stage, repo, archive, code, seconds, peak, usage)})
        print(f"  {stage}: {seconds:.1f} s, rc {code}", flush=True)
        if code:
            print(f"  {stage} failed; the end of {log}:\n{log.read_text()[-3000:]}", flush=True)
            return rows, False
    return rows, True


# ---- report -----------------------------------------------------------------------------

COLUMNS = (
    ("rev", "rev"),
    ("stage", "stage"),
    ("seconds", "seconds"),
    ("cpu_seconds", "cpu s"),
    ("images", "images"),
    ("images_per_second", "images/s"),
    ("tree_rss_mib", "tree MiB"),
    ("max_rss_mib", "max MiB"),
    *((f"disk_{key}_mb", f"{key} MB") for key in [*DISK, "total"]),
)


def total_row(rows):
    last = rows[-1]
    return {
        "rev": last["rev"],
        "stage": "**total**",
        "seconds": round(sum(row["seconds"] for row in rows), 1),
        "cpu_seconds": round(sum(row["cpu_seconds"] for row in rows), 1),
        "tree_rss_mib": max(row["tree_rss_mib"] for row in rows),
        "max_rss_mib": max(row["max_rss_mib"] for row in rows),
        **{key: value for key, value in last.items() if key.startswith("disk_")},
    }


def markdown(rows):
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|"
        + "|".join(" --- " if key in ("rev", "stage") else " ---: " for key, _ in COLUMNS)
        + "|",
    ]
    for row in rows:
        cells = ("" if row.get(key) is None else str(row[key]) for key, _ in COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3000, help="first N records of wiki.mat")
    parser.add_argument("--mat", type=Path, default=DEFAULT_MAT, help="the real wiki.mat")
    parser.add_argument("--epochs", type=int, default=2, help="train.epochs")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml value"
    )
    parser.add_argument(
        "--rev", action="append", help="git revision or `worktree` (repeatable; default HEAD)"
    )
    parser.add_argument("--image-size", type=int, default=0, help="0: the real crop's size")
    parser.add_argument("--archive", help="where to write (or reuse) the archive")
    parser.add_argument("--workdir", help="parent folder of the scratch directory")
    parser.add_argument("--out", type=Path, help="the rows as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    if not args.mat.is_file():
        parser.error(f"{args.mat} not found: give the real wiki.mat with --mat")
    args.mat = args.mat.resolve()
    return args


def settings_of(args):
    settings = {"data.dataset": "wiki_crop", "train.epochs": args.epochs}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--set {item}: expected KEY=VALUE")
        settings[key] = yaml.safe_load(value)
    return settings


def main():
    args = parse_args()
    settings = settings_of(args)
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir))
    rows, keep = [], args.keep
    try:
        archive = archive_path(args, workdir)
        clones = [
            prepare_revision(index, rev, workdir, archive, settings)
            for index, rev in enumerate(args.rev or ["HEAD"])
        ]
        build_seconds = build_archive(args, archive)
        done = []
        for clone in clones:
            revision, succeeded = run_stages(*clone, archive)
            rows += revision + [total_row(revision)]
            done.append(succeeded)
        print(
            f"\n{args.records} records of {args.mat.name}, {os.cpu_count()} CPU cores, "
            f"settings {settings}\n\n{markdown(rows)}"
        )
        if args.out:
            report = {
                "records": args.records,
                "settings": settings,
                "image_size": args.image_size or "face box x 1.8",
                "archive_build_seconds": build_seconds,
                "cpu_count": os.cpu_count(),
                "rows": rows,
            }
            args.out.write_text(json.dumps(report, indent=1) + "\n")
        keep = keep or not all(done)  # a failed stage keeps its clone and log
    except Exception:
        keep = True  # so does a crash of the bench; a usage error (SystemExit) does not
        raise
    finally:
        if keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
