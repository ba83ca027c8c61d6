"""The large-batch claim measured fairly: every (optimizer, batch) tuned with the same trial
budget, two readouts (final test accuracy at a fixed epoch budget; steps to a target
accuracy), the winners rerun with more seeds, and the gradient noise scale that predicts
where perfect scaling ends (McCandlish et al. 2018; the design follows Shallue et al. 2019
and Nado et al. 2021).

    python -m benchmarks.critical_batch [--jobs 2] [--nowrite]     # the study (hours)
    python -m benchmarks.critical_batch --quick                     # CI: the pipeline, ~2 min

Fashion-MNIST, ``--model`` (small_cnn), one ``lars-train`` process per trial (a world of one;
a batch larger than --max_pass_batch is reached by accumulating backward passes, which
gives the same update as that many ranks), --jobs trials side by side, each on
``cores / jobs`` threads. Every trial has the same schedule shape (linear warmup from 0, then
polynomial decay of power 2 to 0), weight decay 5e-4 (not on biases and normalisation
parameters), momentum (LAMB: beta_1) 0.9, and --epochs epochs.

Optimizers: ``lars``; ``nesterov`` (momentum SGD with Nesterov momentum and the same weight
decay, no trust ratio); ``lamb`` (Keras 3's LAMB). Tuning, the same for each (optimizer,
batch): the peak rate over --lr_factors times the centre ``REFERENCE_LR[optimizer] *
(batch / 128) ** 0.5`` (the square-root rule from a rate that suits batch 128), crossed
with --warmups (epochs): ``len(lr_factors) * len(warmups)`` trials each. The best trial by
final accuracy (and, separately, by steps to the target) is reported; a best rate at the
edge of its grid is flagged. The best trial by final accuracy is then rerun with seeds
1 .. --seeds - 1; the table gives mean and spread (standard deviation) over the seeds, and
calls a difference to batch 128 smaller than the spread a tie.

Steps to target: the updates up to the end of the first epoch whose test accuracy reaches
--target (evaluated once per epoch, so resolved to one epoch's updates). Trials that
accumulate passes measure the gradient noise scale (``--noise_scale_every=1``), and the plot
marks its median over those trials' epochs.

Trials are kept in --workdir (one folder each, with lars-train's summary.json): a rerun
skips the trials already done, so an interrupted study resumes. Writes
benchmarks/results/critical_batch.{json,png} (two panels) and its RESULTS.md section (not
with --quick, whose figures come from too short a run to mean anything).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from absl import app, flags

from benchmarks import common
from lars_tf import testing

flags.DEFINE_bool("quick", False, "CI smoke run of the pipeline: the MLP, batches 256 and "
                  "2048, 2 rates x 1 warmup, 2 epochs, one seed, target 0.75; its trials go to a "
                  "temporary folder, removed when the check passes (unless --workdir is given).")
flags.DEFINE_string("model", "small_cnn", "Registered model.")
flags.DEFINE_integer("epochs", 40, "Epoch budget of every trial.")
flags.DEFINE_list("batches", ["128", "512", "2048", "8192", "16384"], "Global batches.")
flags.DEFINE_list("optimizers", ["lars", "nesterov", "lamb"], "Optimizers compared.")
flags.DEFINE_list("lr_factors", ["0.25", "0.5", "1", "2", "4"],
                  "Peak rates tried, as factors of the square-root-rule centre.")
flags.DEFINE_list("warmups", ["1", "5"], "Warmup lengths tried (epochs).")
flags.DEFINE_integer("seeds", 3, "Seeds of each winning configuration (the tuning seed 0 "
                     "and seeds 1 .. N-1).")
flags.DEFINE_float("target", 0.90, "Test accuracy of the steps-to-target readout.")
flags.DEFINE_integer("jobs", 2, "Trials run side by side.")
flags.DEFINE_integer("max_pass_batch", 2048, "Largest batch of one backward pass.")
flags.DEFINE_string("workdir", str(Path("/tmp") / "lars_tf_critical_batch"),
                    "Folder of the trials (kept: a rerun skips what is done).")
common.define_output_flags("critical_batch")
FLAGS = flags.FLAGS

BASE = 128
# Peak rates that suit batch 128 (the centre of each grid scales from them by sqrt(B/128)):
# LARS' trust ratio (eta 0.001) makes its step a fraction of each layer's weight norm, so
# its rate is larger than SGD's by orders of magnitude; LAMB's rate is Adam's.
REFERENCE_LR = {"lars": 1.0, "nesterov": 0.05, "lamb": 0.002}


def _pass_count(batch: int) -> int:
    passes = 1
    while batch // passes > FLAGS.max_pass_batch:
        passes *= 2
    return passes


def plan() -> list[dict]:
    """The tuning trials, in an order that runs the slow (small-batch) ones first."""
    trials = []
    for batch in sorted(map(int, FLAGS.batches)):
        for optimizer in FLAGS.optimizers:
            centre = REFERENCE_LR[optimizer] * (batch / BASE) ** 0.5
            for factor in FLAGS.lr_factors:
                for warmup in FLAGS.warmups:
                    trials.append({"optimizer": optimizer, "batch": batch,
                                   "lr_factor": float(factor), "lr": centre * float(factor),
                                   "warmup": float(warmup), "seed": 0})
    return trials


def _name(t: dict) -> str:
    return (f"{t['optimizer']}-b{t['batch']}-lr{t['lr']:.5g}-w{t['warmup']:g}-"
            f"s{t['seed']}")


def run_trial(t: dict, workdir: Path, threads: int) -> dict:
    """One lars-train process; its summary (reused when the trial is done already)."""
    out = workdir / _name(t)
    summary = out / "summary.json"
    if not summary.exists():
        passes = _pass_count(t["batch"])
        cmd = [str(testing.BIN / "lars-train"), f"--model={FLAGS.model}",
               "--dataset=fashion_mnist", f"--global_batch_size={t['batch']}",
               f"--backward_passes_per_step={passes}", f"--optimizer={t['optimizer']}",
               f"--learning_rate={t['lr']}", f"--warmup_epochs={t['warmup']}",
               f"--epochs={FLAGS.epochs}", "--weight_decay=5e-4", "--momentum=0.9",
               "--poly_power=2", f"--seed={t['seed']}", "--checkpoint_every=0",
               f"--intra_op_threads={threads}", "--inter_op_threads=1",
               f"--noise_scale_every={1 if passes > 1 else 0}",
               f"--model_dir={out}", "--noprogress_bar"]
        t0 = time.time()
        proc = subprocess.run(cmd, env=testing.job_env(), text=True, capture_output=True,
                              cwd=testing.REPO)
        if proc.returncode != 0 or not summary.exists():
            (out / "stderr.txt").parent.mkdir(parents=True, exist_ok=True)
            (out / "stderr.txt").write_text(proc.stderr)
            raise RuntimeError(f"trial {_name(t)} failed ({proc.returncode}): "
                               f"{proc.stderr[-1500:]}")
        print(f"[critical_batch] {_name(t)} {time.time() - t0:6.0f} s", flush=True)
    s = json.loads(summary.read_text())
    history = s["history"]
    updates = s["updates_per_epoch"]
    accs = [h.get("test_accuracy") for h in history]
    reached = next((h["epoch"] for h in history
                    if h.get("test_accuracy", 0.0) >= FLAGS.target), None)
    return {**t, "final_test_accuracy": s["final_test_accuracy"], "test_accuracy": accs,
            "updates_per_epoch": updates,
            "steps_to_target": None if reached is None else reached * updates,
            "noise_scale": [h["noise_scale"] for h in history if "noise_scale" in h],
            "wall_sec": s.get("wall_time_sec")}


def run_all(trials: list[dict], workdir: Path) -> list[dict]:
    threads = max(1, (os.cpu_count() or 1) // FLAGS.jobs)
    with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as pool:
        return list(pool.map(lambda t: run_trial(t, workdir, threads), trials))


def best(rows: list[dict], key: str, lower: bool = False) -> dict | None:
    """The best row by ``key`` (None values lose), with ``edge`` set when its rate is the
    smallest or largest of the grid."""
    rows = [r for r in rows if r[key] is not None]
    if not rows:
        return None
    pick = (min if lower else max)(rows, key=lambda r: r[key])
    factors = sorted(float(f) for f in FLAGS.lr_factors)
    return {**pick, "edge": pick["lr_factor"] in (factors[0], factors[-1])
            and len(factors) > 1}


def main(argv):
    del argv
    scratch = None
    if FLAGS.quick:
        FLAGS.model, FLAGS.epochs, FLAGS.batches = "mlp", 2, ["256", "2048"]
        FLAGS.lr_factors, FLAGS.warmups, FLAGS.seeds = ["0.5", "2"], ["0.5"], 1
        FLAGS.target, FLAGS.max_pass_batch, FLAGS.write = 0.75, 1024, False
        if FLAGS.workdir == flags.FLAGS["workdir"].default:  # removed if the check passes
            FLAGS.workdir = tempfile.mkdtemp(prefix="lars_tf_critical_batch_quick_")
            scratch = FLAGS.workdir
    out = Path(FLAGS.out) if not FLAGS.quick else Path(FLAGS.workdir) / "critical_batch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not FLAGS.report_only:
        t0 = time.time()
        tuning = run_all(plan(), workdir)
        reruns = []
        for batch in sorted(map(int, FLAGS.batches)):
            for optimizer in FLAGS.optimizers:
                mine = [r for r in tuning if (r["batch"], r["optimizer"]) == (batch, optimizer)]
                top = best(mine, "final_test_accuracy")
                reruns += [{k: top[k] for k in ("optimizer", "batch", "lr_factor", "lr",
                                                   "warmup")} | {"seed": s}
                           for s in range(1, FLAGS.seeds)]
        seeded = run_all(reruns, workdir)
        raw = {"command": common.command_line(), "machine": common.machine_line(),
               "quick": FLAGS.quick, "model": FLAGS.model, "epochs": FLAGS.epochs,
               "target": FLAGS.target, "lr_factors": FLAGS.lr_factors,
               "warmups": FLAGS.warmups, "seeds": FLAGS.seeds, "jobs": FLAGS.jobs,
               "reference_lr": REFERENCE_LR, "total_sec": time.time() - t0,
               "tuning": tuning, "reruns": seeded}
        out.write_text(json.dumps(raw, indent=1))
    report(json.loads(out.read_text()), out)
    if FLAGS.quick:
        check_quick(json.loads(out.read_text()), out)  # raises, keeping the trials, if not
        if scratch:
            shutil.rmtree(scratch)


def check_quick(raw: dict, out: Path) -> None:
    """What the quick mode proves: every trial trained, every (optimizer, batch) has its
    cell, the accumulating trials measured a noise scale, the plot was drawn."""
    problems = []
    for r in raw["tuning"]:
        if not r["final_test_accuracy"] or r["final_test_accuracy"] < 0.5:
            problems.append(f"{_name(r)}: final test accuracy {r['final_test_accuracy']}")
        if _pass_count(r["batch"]) > 1 and not r["noise_scale"]:
            problems.append(f"{_name(r)}: accumulates passes but measured no noise scale")
    found = cells(raw)
    if len(found) != len(FLAGS.optimizers) * len(FLAGS.batches):
        problems.append(f"{len(found)} cells for {len(FLAGS.optimizers)} optimizers x "
                        f"{len(FLAGS.batches)} batches")
    if not any(c["fastest"] for c in found):
        problems.append(f"no trial reached the target {FLAGS.target}")
    if not out.with_suffix(".png").exists():
        problems.append("no plot")
    if problems:
        raise SystemExit("critical_batch --quick: " + "; ".join(problems)
                         + f" (the trials are in {out.parent})")
    print(f"critical_batch --quick: {len(raw['tuning'])} trials, {len(found)} cells, "
          f"{raw['total_sec']:.0f} s: the pipeline works")


def cells(raw: dict) -> list[dict]:
    """Per (optimizer, batch): the best trials and the seeds' mean and spread."""
    found = []
    for batch in sorted({r["batch"] for r in raw["tuning"]}):
        for optimizer in raw["reference_lr"]:
            mine = [r for r in raw["tuning"] if (r["batch"], r["optimizer"]) == (batch, optimizer)]
            if not mine:
                continue
            top = best(mine, "final_test_accuracy")
            fastest = best(mine, "steps_to_target", lower=True)
            seeds = [top] + [r for r in raw["reruns"]
                             if (r["batch"], r["optimizer"], r["lr"], r["warmup"])
                             == (batch, optimizer, top["lr"], top["warmup"])]
            accs = [r["final_test_accuracy"] for r in seeds]
            steps = [r["steps_to_target"] for r in seeds if r["steps_to_target"] is not None]
            found.append({
                "optimizer": optimizer, "batch": batch, "trials": len(mine), "best": top,
                "fastest": fastest, "seeds": len(seeds),
                "acc_mean": statistics.mean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "steps_mean": statistics.mean(steps) if steps else None,
                "steps_reached": len(steps),
                "noise_scale": [b for r in mine for b in r["noise_scale"]]})
    return found


def report(raw: dict, out: Path) -> None:
    rows = cells(raw)
    smallest = min(r["batch"] for r in rows)
    table = ["| optimizer | batch | trials | best rate (x centre) | warmup | final test acc "
             f"(mean +- sd over seeds) | vs batch {smallest} | fewest steps to target (its "
             "rate) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        base = next(b for b in rows if b["optimizer"] == c["optimizer"]
                    and b["batch"] == smallest)
        diff = c["acc_mean"] - base["acc_mean"]
        spread = max(c["acc_std"], base["acc_std"])
        verdict = ("-" if c is base else "tie" if abs(diff) <= spread
                   else f"{100 * diff:+.2f} points")
        top, fast = c["best"], c["fastest"]
        table.append(
            f"| {c['optimizer']} | {c['batch']} | {c['trials']} | {top['lr']:.4g} "
            f"({top['lr_factor']:g}x){' edge' if top['edge'] else ''} | {top['warmup']:g} | "
            f"{100 * c['acc_mean']:.2f} +- {100 * c['acc_std']:.2f} ({c['seeds']} seed"
            f"{'s' if c['seeds'] > 1 else ''}) | "
            f"{verdict} | "
            + (f"{fast['steps_to_target']} ({fast['lr']:.4g}{' edge' if fast['edge'] else ''})"
               if fast else "not reached") + " |")
    noise = [b for c in rows for b in c["noise_scale"]]
    png = out.with_suffix(".png")
    plot(rows, raw, noise, png)
    n_trials = len(raw["tuning"]) + len(raw["reruns"])
    description = (
        f"Fashion-MNIST, {raw['model']}, {raw['epochs']} epochs per trial, one lars-train "
        f"process per trial ({raw['jobs']} side by side). Tuning budget per (optimizer, "
        f"batch): {len(raw['lr_factors'])} peak rates (factors "
        f"{', '.join(raw['lr_factors'])} of the square-root-rule centre "
        f"REFERENCE_LR x sqrt(batch / 128), REFERENCE_LR = "
        f"{', '.join(f'{k} {v:g}' for k, v in raw['reference_lr'].items())}) x "
        f"{len(raw['warmups'])} warmups ({', '.join(raw['warmups'])} epochs); the best by "
        f"final accuracy rerun with {raw['seeds']} seeds in all. Target accuracy "
        f"{raw['target']:.2f}, checked once per epoch. {n_trials} trials; the whole run took "
        f"{raw['total_sec'] / 3600:.1f} h. Raw results: "
        f"`{os.path.relpath(out, common.RESULTS.parent)}`.")
    conclusion = (
        "A difference smaller than the spread over seeds is a tie. 'edge': the best rate is "
        "at the end of its grid, so a better one may lie outside it."
        + (f" Gradient noise scale B_simple (trials that accumulate passes): median "
           f"{statistics.median(noise):.0f} examples over {len(noise)} epoch estimates."
           if noise else ""))
    common.report("critical_batch", "Critical batch: tuned optimizers, steps to target, "
                  "noise scale (`benchmarks/critical_batch.py`)", description,
                  table + ["", f"![accuracy and steps to target against batch]"
                               f"({os.path.relpath(png, common.RESULTS.parent)})"],
                  conclusion, FLAGS.write and not raw["quick"], raw=raw)


def plot(rows: list[dict], raw: dict, noise: list[float], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, steps_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for optimizer in raw["reference_lr"]:
        mine = [c for c in rows if c["optimizer"] == optimizer]
        if not mine:
            continue
        batches = [c["batch"] for c in mine]
        acc_ax.errorbar(batches, [100 * c["acc_mean"] for c in mine],
                        yerr=[100 * c["acc_std"] for c in mine], marker="o", capsize=3,
                        label=optimizer)
        reached = [c for c in mine if c["fastest"]]
        if reached:
            steps_ax.plot([c["batch"] for c in reached],
                          [c["fastest"]["steps_to_target"] for c in reached], marker="o",
                          label=optimizer)
    base = [c for c in rows if c["fastest"] and c["batch"] == min(r["batch"] for r in rows)]
    if base:
        b0 = base[0]["batch"]
        s0 = min(c["fastest"]["steps_to_target"] for c in base)
        xs = sorted({c["batch"] for c in rows})
        steps_ax.plot(xs, [s0 * b0 / x for x in xs], "k:", label="perfect scaling")
    if noise:
        steps_ax.axvline(statistics.median(noise), color="grey", ls="--",
                         label=f"noise scale B_simple (median {statistics.median(noise):.0f})")
    acc_ax.set(xscale="log", xlabel="global batch", ylabel="final test accuracy (%)",
               title=f"after {raw['epochs']} epochs (best rate; mean +- sd over seeds)")
    steps_ax.set(xscale="log", yscale="log", xlabel="global batch",
                 ylabel=f"updates to {100 * raw['target']:.0f}% test accuracy",
                 title="steps to target (best trial)")
    for ax in (acc_ax, steps_ax):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
