"""Reading a folder of JPEGs at scale: decode throughput against torchvision, and memory against the set's size.

1. Throughput: images/s decoded and cropped to 256×256 from a generated folder of JPEGs of mixed sizes,
   this project's streamed folder (ADM centre crop, ``BatchLoader`` workers) against torchvision's
   ``ImageFolder`` + ``DataLoader`` (``Resize(256)``, ``CenterCrop(256)``, ``PILToTensor``) with the same
   workers and batch size, alternated ``--repeats`` times in one run (the median of each side).
   torchvision is not installed beside this project's torch here: ``--torchvision-python`` names a
   Python that has it, and that side runs there (``--side torchvision``).
2. Memory: the peak resident memory (the trainer's process and its decoding workers, summed, polled every
   20 ms) of a short training run (``selfflow train``, tiny DiT, 32×32 crops, ``--train-steps`` steps)
   reading the first 1 000 images and then all of them; the index is built by an untimed run first.

    python benchmarks/data_loading.py --images 20000 --workers 2 --torchvision-python /work/venv-tv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, count: int, classes: int = 100, seed: int = 0) -> Path:
    """``count`` JPEGs (quality 90) of sizes drawn in [160, 640]×[160, 640]: smooth colour fields plus noise."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and int(done.read_text()) == count:
        return root
    rng = np.random.default_rng(seed)
    noise = rng.integers(-12, 13, (700, 700, 3), dtype=np.int16)  # one tile, windows of it per image (drawing is slower than encoding)
    for k in range(count):
        folder = root / f"class_{k % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = (int(v) for v in rng.integers(160, 641, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
        top, left = (int(v) for v in rng.integers(0, 700 - 640, 2))
        pixels = np.asarray(coarse, dtype=np.int16) + noise[top:top + height, left:left + width]
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{k:06d}.jpg", quality=90)
    done.write_text(str(count))
    return root


def subset(source: Path, target: Path, count: int) -> Path:
    """The first ``count`` images of ``source`` (in generation order) as hard links."""
    done = target / ".complete"
    if done.is_file() and int(done.read_text()) == count:
        return target
    for file in sorted(source.rglob("*.jpg"), key=lambda p: p.name)[:count]:
        link = target / file.parent.name / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.link(file, link)
    done.write_text(str(count))
    return target


# --------------------------------------------------------------------------------------------
# throughput, one side per call
# --------------------------------------------------------------------------------------------
def throughput_ours(folder: Path, workers: int, batch: int, batches: int, warmup: int) -> float:
    import torch

    torch.set_num_threads(1)
    from selfflow.data import BatchLoader, IndexStream, load_dataset

    data = load_dataset("folder", folder, image_size=256, crop="center", channels=3)
    loader = BatchLoader(data, IndexStream(len(data), batch, seed=0), num_workers=workers)
    for _ in range(warmup):
        loader.next_batch()
    start = time.perf_counter()
    for _ in range(batches):
        _, images, _ = loader.next_batch()
        assert images.shape[1:] == (3, 256, 256)
    elapsed = time.perf_counter() - start
    loader.close()
    return batches * batch / elapsed


def _adm_crop():
    """selfflow's ADM centre crop, loaded from its file alone (the torchvision Python has no selfflow dependencies)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("selfflow_preprocess", ROOT / "selfflow" / "data" / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda picture: module.prepare_image(picture, 256, "center", 3)


def throughput_torchvision(folder: Path, workers: int, batch: int, batches: int, warmup: int, adm: bool = False) -> float:
    import torch
    from torchvision import datasets, transforms

    torch.set_num_threads(1)
    if adm:  # the same preprocessing as ours, through torchvision's ImageFolder and DataLoader
        crop = _adm_crop()
        transform = transforms.Lambda(lambda picture: torch.from_numpy(crop(picture)))
    else:
        transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(256), transforms.PILToTensor()])
    data = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    batches_seen, start = 0, None
    for images, _ in loader:
        batches_seen += 1
        if batches_seen == warmup:
            start = time.perf_counter()
        elif batches_seen == warmup + batches:
            break
    return batches * batch / (time.perf_counter() - start)


def run_side(side: str, python: str, args) -> float:
    command = [python, __file__, "--side", side, "--folder", str(args.throughput_folder), "--workers", str(args.workers),
               "--batch", str(args.batch), "--batches", str(args.batches), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SELFFLOW_CACHE": str(args.work / "cache")}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} side failed:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"])


# --------------------------------------------------------------------------------------------
# peak memory of a short training read
# --------------------------------------------------------------------------------------------
def peak_rss_of_training(folder: Path, out: Path, steps: int, workers: int, cache: Path) -> dict:
    import psutil

    command = [sys.executable, "-m", "selfflow", "train", "--set", "data.name=folder", "--set", f"data.path={folder}",
               "--set", "data.image_size=32", "--set", "data.channels=3", "--set", "model.depth=2", "--set", "model.hidden_size=64",
               "--set", "model.patch_size=4", "--set", f"train.steps={steps}", "--set", "train.batch_size=32",
               "--set", "train.device=cpu", "--set", "train.progress=false", "--set", "train.tensorboard=false",
               "--set", "train.ckpt_every=0", "--set", "train.num_sample_images=0", "--set", f"train.num_workers={workers}",
               "--set", f"train.out_dir={out}", "--set", "train.log_every=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SELFFLOW_CACHE": str(cache)}
    start = time.perf_counter()
    process = psutil.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_tree = peak_main = 0
    while process.poll() is None:
        try:
            main = process.memory_info().rss
            tree = main + sum(child.memory_info().rss for child in process.children(recursive=True))
        except psutil.Error:
            continue
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(0.02)
    if process.returncode != 0:
        raise SystemExit(f"training on {folder} failed: {process.stderr.read().decode()[-2000:]}")
    return {"peak_rss_main_mib": round(peak_main / 2**20, 1), "peak_rss_with_workers_mib": round(peak_tree / 2**20, 1),
            "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["ours", "torchvision", "torchvision-adm"], default=None,
                        help="(internal) measure one side and print JSON")
    parser.add_argument("--folder", type=Path, default=None, help="(with --side) the folder to read")
    parser.add_argument("--work", type=Path, default=Path("/tmp/selfflow_data_loading"), help="where the JPEG folders are generated")
    parser.add_argument("--images", type=int, default=20000, help="the large folder (memory); the small one has 1000")
    parser.add_argument("--throughput-images", type=int, default=2000, help="the folder the throughput is read from")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the two sides")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--torchvision-python", default=sys.executable, help="a Python with torchvision (and torch) installed")
    parser.add_argument("--name", default="data_loading_cpu")
    args = parser.parse_args()

    if args.side:
        if args.side == "ours":
            value = throughput_ours(args.folder, args.workers, args.batch, args.batches, args.warmup)
        else:
            value = throughput_torchvision(args.folder, args.workers, args.batch, args.batches, args.warmup, adm=args.side == "torchvision-adm")
        print(json.dumps({"images_per_s": value}))
        return

    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import write_result

    large = make_folder(args.work / f"jpeg_{args.images}", args.images)
    small = subset(large, args.work / "jpeg_1000", 1000)
    args.throughput_folder = subset(large, args.work / f"jpeg_{args.throughput_images}", args.throughput_images)
    version = subprocess.run([args.torchvision_python, "-c", "import torch, torchvision; print(torch.__version__, torchvision.__version__)"],
                             capture_output=True, text=True).stdout.strip()

    run_side("ours", sys.executable, args)  # the index of the throughput folder, built once (not timed)
    ours, theirs, theirs_adm = [], [], []
    for _ in range(args.repeats):
        ours.append(run_side("ours", sys.executable, args))
        theirs.append(run_side("torchvision", args.torchvision_python, args))
        theirs_adm.append(run_side("torchvision-adm", args.torchvision_python, args))
        print(f"ours {ours[-1]:.1f} img/s, torchvision {theirs[-1]:.1f} img/s, torchvision + ADM crop {theirs_adm[-1]:.1f} img/s", flush=True)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    runs = lambda values: ", ".join(f"{v:.1f}" for v in values)  # noqa: E731
    rows = [{"what": "images/s to 256×256, selfflow folder (ADM centre crop)", "value": round(median(ours), 1), "runs": runs(ours)},
            {"what": "images/s to 256×256, torchvision ImageFolder (Resize 256 bilinear + CenterCrop 256)", "value": round(median(theirs), 1),
             "runs": runs(theirs)},
            {"what": "images/s to 256×256, torchvision ImageFolder with the same ADM centre crop", "value": round(median(theirs_adm), 1),
             "runs": runs(theirs_adm)},
            {"what": "ratio selfflow / torchvision, each its own crop (medians)", "value": round(median(ours) / median(theirs), 3), "runs": ""},
            {"what": "ratio selfflow / torchvision, the same ADM crop (medians)", "value": round(median(ours) / median(theirs_adm), 3), "runs": ""}]

    cache = args.work / "cache"
    memory = {}
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=args.work))  # fresh run folders: an old one would resume, not train
    for label, folder in (("1000", small), (str(args.images), large)):
        peak_rss_of_training(folder, runs / f"index_{label}", 1, args.workers, cache)  # builds the index
        memory[label] = peak_rss_of_training(folder, runs / f"run_{label}", args.train_steps, args.workers, cache)
        print(f"{label} images: {memory[label]}", flush=True)
    for label, record in memory.items():
        rows.append({"what": f"peak RSS, trainer + {args.workers} workers, {args.train_steps} steps on {label} images (MiB)",
                     "value": record["peak_rss_with_workers_mib"], "runs": f"trainer alone {record['peak_rss_main_mib']} MiB, {record['wall_s']} s"})
    ratio = memory[str(args.images)]["peak_rss_with_workers_mib"] / memory["1000"]["peak_rss_with_workers_mib"]
    rows.append({"what": f"peak RSS ratio {args.images} / 1000 images", "value": round(ratio, 3), "runs": "target ≤ 1.3"})
    notes = (f"torchvision side: `{args.torchvision_python}` (torch, torchvision {version}); selfflow side: this Python. "
             f"Both: {args.workers} DataLoader workers, batch {args.batch}, 1 torch thread per process, "
             f"{args.batches} timed batches after {args.warmup} warm-up batches, {args.repeats} alternations; folder of "
             f"{args.throughput_images} JPEGs (quality 90) of sizes uniform in [160, 640]² in 100 class folders. "
             "The crops differ as the two projects define them: ADM's (box halving while the short side ≥ 512, bicubic, "
             "centre window) here, a bilinear short-side resize then a centre window in torchvision's usual pipeline; the third "
             "row gives torchvision's loader the very same ADM crop (selfflow/data/preprocess.py as a transforms.Lambda): the "
             "difference left is the loaders'. "
             f"Memory: `selfflow train` on the first 1000 and on all {args.images} images (tiny DiT, 32×32 crops), "
             "RSS of the trainer and its workers summed, polled every 20 ms, the folder index already cached.")
    path = write_result(args.name, rows, ["what", "value", "runs"], "Reading a folder of JPEGs: throughput and memory", notes,
                        extra={"throughput": {"ours": ours, "torchvision": theirs, "torchvision_adm": theirs_adm}, "memory": memory})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
