"""Ship a trained feature head inside draftlm: `python scripts/ship_head.py RUN NAME`.

Copies `RUN/final` (config.json, model.safetensors) into `src/draftlm/trained/NAME/` with
what a user needs to trust and rebuild it: the recipe as it ran (`recipe.yaml`), the data
it saw (`data.json`: the teacher's manifest summary and the prepared corpus' settings),
the training log summary (`training.json`: first and last losses, validation figures,
tokens, throughput) and `SHA256SUMS`, which `load_feature_head` checks on every load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "src" / "draftlm" / "trained"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summarize_metrics(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    start = next(r for r in records if r.get("event") == "start")
    rates = [r["tokens_per_second"] for r in steps if r.get("tokens_per_second")]
    mfus = [r["mfu"] for r in steps if r.get("mfu")]
    return {
        "parameters": start["parameters"], "flops_per_token": start["flops_per_token"],
        "steps": steps[-1]["step"], "tokens": steps[-1]["tokens"],
        "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
        "validation": [{k: v for k, v in r.items() if k.startswith("val_") or k == "step"}
                       for r in vals],
        "tokens_per_second_median": sorted(rates)[len(rates) // 2] if rates else None,
        "mfu_median": sorted(mfus)[len(mfus) // 2] if mfus else None,
    }


def data_summary(teacher: Path) -> dict:
    manifest = json.loads((teacher / "manifest.json").read_text())
    windows = sum(s["num_windows"] for s in manifest["shards"])
    spec = manifest["spec"]
    data = Path(spec["data"])
    prepared = json.loads((data / "manifest.json").read_text())
    files = [json.loads(line) for line in (data / "files.jsonl").read_text().splitlines()]
    kept = [f for f in files if "split" in f]
    return {
        "teacher": {**spec, "windows": windows, "tokens": windows * spec["seq_len"],
                    "target_seconds": manifest["target_seconds"],
                    "target_fingerprint": manifest["target_fingerprint"]},
        "corpus": {"rules": prepared.get("rules"), "files_seen": len(files),
                   "files_kept": len(kept),
                   "files_train": sum(f["split"] == "train" for f in kept),
                   "files_val": sum(f["split"] == "val" for f in kept),
                   "dropped": {reason: sum(f.get("dropped") == reason for f in files)
                               for reason in sorted({f["dropped"] for f in files
                                                     if "dropped" in f})}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a feature-head run folder (out_dir)")
    parser.add_argument("name", help="the name --draft will take")
    args = parser.parse_args()
    final = args.run / "final"
    state = json.loads(sorted((args.run / "checkpoints").glob("step-*"))[-1]
                       .joinpath("state.json").read_text())
    folder = TRAINED / args.name
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(final / name, folder / name)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(state["train"], sort_keys=False))
    (folder / "data.json").write_text(json.dumps(
        data_summary(Path(state["train"]["teacher"])), indent=1) + "\n")
    (folder / "training.json").write_text(json.dumps(
        summarize_metrics(args.run / "metrics.jsonl"), indent=1) + "\n")
    listed = ["config.json", "model.safetensors", "recipe.yaml", "data.json", "training.json"]
    (folder / "SHA256SUMS").write_text(
        "".join(f"{sha256(folder / n)}  {n}\n" for n in listed))
    print(folder)


if __name__ == "__main__":
    main()
