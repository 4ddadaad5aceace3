"""The paper's cost claim: ALF vs fine-tuning on the same data and backbone, in one run.

    time(probe=finetune) / time(probe=alf)            (the paper: ~36x)
    trainable params(probe=alf) / (probe=finetune)     (the paper: < 5 %)
    test balanced accuracy of each, side by side

Each side is one real ``python -m alfusion`` run in a fresh ``paths.root`` (nothing cached),
with the same search grid, the same data, backbone and recipe:

- ALF (``probe=alf``, cached mode): feature extraction of train and test, the search (the
  grid trained as one bank on 80 % of train, selected on the validation split), the refit on
  all of train, the test;
- fine-tuning (``probe=finetune``, mode=finetune): the backbone trains with a linear head on
  the final CLS: one fit per configuration of the grid (each from the pretrained weights),
  selection, the refit, the test.

Time to the tested model = inputs + search + refit as the run records them in results.json
(``seconds``: extraction or dataset set-up, grid fits with validation, final fit); the
process's wall and CPU time (user + system, from its rusage: the steadier figure on shared
cores) are printed beside it. Trainable parameters: the probe's (ALF; results.json
``probe_params``) and the backbone's plus the head's (fine-tuning: every backbone parameter
trains).

Defaults (a CPU-sized run): the offline ViT-S/14 at 56 px, the first 200 train and 200 test
digits, ``search=quick`` (3 learning rates), 10 epochs per fit on both sides
(``train.epochs=10 train.min_steps=0``; the paper's recipe is 40 epochs and, on cached
features, >= 1000 steps). Variables: ``BENCH_COST_IMG``, ``BENCH_COST_LIMIT``,
``BENCH_COST_EPOCHS``, ``BENCH_COST_SEARCH``; ``BENCH_COST_ALF`` and ``BENCH_COST_FINETUNE``
(extra overrides of one side, e.g. the paper code's single fine-tuning configuration:
``BENCH_COST_FINETUNE="search=none search.lr=0.001 search.wd=0.1 search.validate=false"``);
``BENCH_COST_ARGS`` (overrides for both runs, replacing the CPU size settings), e.g. on a GPU
at the paper's size and recipe:

    BENCH_COST_ARGS="backbone=vit_b dataset=eurosat search=paper trainer=gpu \
        end2end.num_workers=8" python -m benchmarks cost
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = int(os.environ.get("BENCH_COST_IMG", 56))
LIMIT = int(os.environ.get("BENCH_COST_LIMIT", 200))
EPOCHS = int(os.environ.get("BENCH_COST_EPOCHS", 10))
SEARCH = os.environ.get("BENCH_COST_SEARCH", "quick")
EXTRA = shlex.split(os.environ.get("BENCH_COST_ARGS", ""))
GPU_COMMAND = ('BENCH_COST_ARGS="backbone=vit_b dataset=eurosat search=paper trainer=gpu '
               'end2end.num_workers=8" python -m benchmarks cost')
SIDES = {
    "alf": ["probe=alf", "mode=cached", *shlex.split(os.environ.get("BENCH_COST_ALF", ""))],
    "finetune": ["probe=finetune", "mode=finetune",
                 *shlex.split(os.environ.get("BENCH_COST_FINETUNE", ""))],
}


def common_args() -> list[str]:
    """The settings both runs share: the CPU size, or BENCH_COST_ARGS."""
    if EXTRA:
        return EXTRA
    return ["backbone=offline_vit_s14", f"backbone.img_size={IMG}", "dataset=digits",
            f"dataset.limit={LIMIT}", f"search={SEARCH}", f"train.epochs={EPOCHS}",
            "train.min_steps=0", "end2end.num_workers=0"]


def run(side: str, root: Path) -> dict:
    """One ``python -m alfusion`` run: its results.json plus wall and CPU seconds."""
    args = [*common_args(), *SIDES[side], f"paths.root={root}", f"hydra.run.dir={root}/run",
            "trainer.progress_bar=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ALFUSION_NO_PROGRESS="1")
    with open(root.parent / f"{side}.log", "w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "alfusion", *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: the run must not go on alone
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise RuntimeError(f"alfusion {' '.join(args)} failed:\n{log.read()[-5000:]}")
    results = json.loads((root / "run" / "results.json").read_text())
    return dict(results=results, wall=wall, cpu=usage.ru_utime + usage.ru_stime,
                model_s=sum(results["seconds"].values()))


def backbone_params(args: list[str]) -> int:
    """Parameters of the backbone as the runs build it (all of them train when fine-tuning)."""
    from hydra import compose, initialize_config_dir

    from alfusion.backbones import build_backbone

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args)
    backbone, _ = build_backbone(cfg.backbone)  # also converts offline weights, untimed
    return sum(p.numel() for p in backbone.parameters())


def main() -> dict:
    args = common_args()
    print(f"ALF vs fine-tuning, time to the tested model: {' '.join(args)}"
          f"{'; ALF: ' + ' '.join(SIDES['alf'][2:]) if SIDES['alf'][2:] else ''}"
          f"{'; fine-tuning: ' + ' '.join(SIDES['finetune'][2:]) if SIDES['finetune'][2:] else ''}",
          flush=True)
    print(f"  (GPU: {GPU_COMMAND})", flush=True)
    backbone = backbone_params([a for a in args if a.split("=")[0].startswith("backbone")])
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_cost_") as tmp:
        for side in SIDES:
            root = Path(tmp) / side / "root"
            root.mkdir(parents=True)
            out[side] = r = run(side, root)
            s = r["results"]["seconds"]
            r["trainable"] = r["results"]["probe_params"] + (backbone if side == "finetune"
                                                              else 0)
            print(f"  {side:8s}: {r['model_s']:8.1f} s to the tested model (inputs "
                  f"{s['inputs']:.1f} + search {s['search']:.1f} + refit {s['fit']:.1f}); "
                  f"process {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU; "
                  f"{r['trainable']:,} trainable params; test balanced accuracy "
                  f"{r['results']['test']['bal_acc']:.4f} ({r['results']['fit']['steps']} "
                  f"refit steps of {r['results']['fit']['batch_size']})", flush=True)
    alf, ft = out["alf"], out["finetune"]
    ratios = dict(time=ft["model_s"] / alf["model_s"], wall=ft["wall"] / alf["wall"],
                  cpu=ft["cpu"] / alf["cpu"], params=alf["trainable"] / ft["trainable"],
                  bal_acc=alf["results"]["test"]["bal_acc"] - ft["results"]["test"]["bal_acc"])
    print(f"  fine-tuning / ALF time to the tested model: {ratios['time']:.1f}x "
          f"(process wall {ratios['wall']:.1f}x, CPU {ratios['cpu']:.1f}x)   [paper: ~36x]")
    print(f"  ALF / fine-tuning trainable parameters: {100 * ratios['params']:.2f} %   "
          f"[paper: < 5 %]")
    print(f"  test balanced accuracy ALF - fine-tuning: {ratios['bal_acc']:+.4f}", flush=True)
    return dict(ratios=ratios, runs={k: {x: v[x] for x in ("model_s", "wall", "cpu",
                                                           "trainable")}
                                     for k, v in out.items()})


if __name__ == "__main__":
    main()
