"""Calibrate the collapse alarm: its false alarms on healthy runs, its detection of induced collapses.

Probe results of tiny runs are recorded once and replayed offline through the alarm's public API
(``CollapseAlert``, ``Alarm``, ``Alarm.check``) for a grid of rules. Runs: the demo recipe
(``mnn_callback.demo``: bundled text, 4-layer GPT-2, d = 64, 128 tokens, batch 16, AdamW at lr 3e-3
with the Trainer's 5% warm-up, cosine decay, weight decay 0.01 off biases and norms, clipping at 1)
in a plain loop; per seed a healthy run of ``--steps`` and, from its state at half of them (the
onset), one branch per induced collapse for 200 more steps. Every probe is exact, on 32 held-out
packed sequences (paired standard errors, as in the monitor), at steps 0 (the reference), 1, 2,
4, ..., 32 and every 10. Collapses: ``lr_x30``/``lr_x100``, the learning rate times 30/100 from the
onset on; ``prune_48``/``prune_60``, magnitude pruning (``torch.nn.utils.prune.l1_unstructured``)
of 48 or 60 of the 64 gains of the final LayerNorm, so the last hidden state lives in 16 or 4
directions (an over-aggressive global pruning that did not spare the norms); ``prune_slow``, 4
gains more every 10 steps (a gradual pruning schedule), 60 after 15 of them.

Rules: Matrix Entropy with min_drop 0.05 ... 0.4, eRank with 0.1 ... 0.7 (eRank = exp(H): a fall of a
share r of Matrix Entropy at H = 0.75 ln 64 is 1 - exp(-r H) of eRank, 0.05 -> 0.14, 0.25 -> 0.54,
0.4 -> 0.71); k 2, 3, 4; baseline the previous probe (window 1), four back, or the step-0 reference; warmup
0, the default (``every_n_steps``, in an episode until a probe without a fall), 50, 100; replayed on
``every_n_steps=10, schedule="log"`` (0, 1, 2, 4, 8, 10, 20, ...), the warm-up table also on ``fixed`` 10
and the demo's ``log`` 50.

Usage: ``python benchmarks/alarm.py [--quick] [--seeds 3] [--steps 600] [--json out.json]`` (12.5 CPU
minutes on one core); ``--replay out.json`` replays the runs a ``--json`` saved, without training.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.utils.prune
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, machine, save_results

from mnn_callback.demo import prepare_data, tiny_gpt2_config
from mnn_callback.monitoring.alarm import Alarm, CollapseAlert
from mnn_callback.probing.probe import Probe, ProbeResult

EARLY = (1, 2, 4, 8, 16, 32)
GRID = {"matrix_entropy": (0.05, 0.1, 0.15, 0.25, 0.4), "erank": (0.1, 0.2, 0.3, 0.5, 0.7)}
KS = (2, 3, 4)
BASELINES = {"window 1": ("window", 1), "window 4": ("window", 4), "reference": ("reference", 1)}
WARMUPS = {"0": 0, "default": None, "50": 50, "100": 100}  # default: every_n_steps, in an episode
FIELDS = ("metric", "k", "min_drop", "baseline", "warmup")
SHORT = {"matrix_entropy": "ME", "erank": "eRank"}
Probes = list[tuple[int, ProbeResult]]


class Replayed(ProbeResult):
    """A recorded result that compares itself with each other probe once (the grid replays each pair for
    every rule); a baseline copy sharing a probe's values (``dataclasses.replace``) and fields is that probe."""

    def _once(self, kind: str, other: ProbeResult, options: dict[str, Any]) -> dict[str, list[float]]:
        cache = self.__dict__.setdefault("_compared", {})
        key = (kind, id(other.per_layer), tuple(sorted(other.per_sequence or ())), tuple(sorted(options.items())))
        if key not in cache:  # other stays referenced, so its values' id stays its own
            cache[key] = (other, getattr(super(), kind)(other, **options))
        return {name: list(values) for name, values in cache[key][1].items()}

    def differences(self, reference: ProbeResult, **options: Any) -> dict[str, list[float]]:
        return self._once("differences", reference, options)

    def difference_errors(self, reference: ProbeResult, **options: Any) -> dict[str, list[float]]:
        return self._once("difference_errors", reference, options)


@dataclass(frozen=True)
class Recipe:
    """The runs' sizes; ``every`` is the probing cadence the rules are replayed on."""

    steps: int = 600
    onset: int = 300
    after: int = 200
    every: int = 10
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    samples: int = 32
    seeds: int = 3
    max_train_chars: int | None = None

    def recorded(self, step: int) -> bool:
        return step % self.every == 0 or step in EARLY


QUICK = Recipe(steps=16, onset=8, after=8, every=4, seq_len=32, batch_size=4, samples=4, seeds=1, max_train_chars=50000)


class Training:
    """One run of the demo recipe in a plain loop; ``copy.deepcopy`` branches it (model and optimizer)."""

    def __init__(self, data: Any, recipe: Recipe, seed: int) -> None:
        from transformers import GPT2LMHeadModel

        torch.manual_seed(seed)
        self.recipe = recipe
        self.model = GPT2LMHeadModel(tiny_gpt2_config(len(data.tokenizer), n_positions=recipe.seq_len))
        norms_and_biases = [p for p in self.model.parameters() if p.dim() < 2]
        weights = [p for p in self.model.parameters() if p.dim() >= 2]
        groups = [{"params": weights, "weight_decay": 0.01}, {"params": norms_and_biases, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=recipe.lr)
        self.lr_factor = 1.0
        chunks = torch.tensor(data.train_chunks)
        generator = torch.Generator().manual_seed(seed)
        size = recipe.steps * recipe.batch_size  # the Trainer's sampler: a fresh permutation per epoch
        order = torch.cat([torch.randperm(len(chunks), generator=generator) for _ in range(-(-size // len(chunks)))])
        self.batches = chunks[order[:size]].view(recipe.steps, recipe.batch_size, -1)

    def lr(self, step: int) -> float:
        """The Trainer's linear warm-up (5% of the steps) and cosine decay to 0 at ``recipe.steps``."""
        warm = max(1, self.recipe.steps // 20)
        if step < warm:
            return self.recipe.lr * step / warm
        progress = (step - warm) / max(1, self.recipe.steps - warm)
        return self.recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def train_step(self, step: int) -> float:
        """Optimizer step number ``step`` (1, 2, ...); returns its training loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(step - 1) * self.lr_factor
        ids = self.batches[(step - 1) % len(self.batches)]
        loss = self.model(input_ids=ids, labels=ids).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.item()


def kept(result: ProbeResult) -> Replayed:
    """A probe's result as recorded: through its JSON form, so a ``--replay`` replays the same values."""
    return Replayed.from_dict(result.to_dict())


def prune_final_norm(training: Training, channels: int) -> None:
    """Magnitude-prune ``channels`` more of the final LayerNorm's gains (``torch.nn.utils.prune``)."""
    torch.nn.utils.prune.l1_unstructured(training.model.transformer.ln_f, "weight", amount=channels)


def collapses(recipe: Recipe) -> dict[str, tuple[str, Callable[[Training, int], None]]]:
    """Per induced collapse: what it is, and what it does before optimizer step ``onset + i`` (i = 1, 2, ...)."""
    every = recipe.every

    def lr_times(factor: float) -> Callable[[Training, int], None]:
        return lambda training, i: setattr(training, "lr_factor", factor)

    def sudden(channels: int) -> Callable[[Training, int], None]:
        return lambda training, i: prune_final_norm(training, channels) if i == 1 else None

    def slow(training: Training, i: int) -> None:
        if (i - 1) % every == 0 and i <= 15 * every:
            prune_final_norm(training, 4)

    return {
        "lr_x30": ("learning rate x30 from the onset on", lr_times(30.0)),
        "lr_x100": ("learning rate x100 from the onset on", lr_times(100.0)),
        "prune_48": ("48 of the 64 final LayerNorm gains pruned at the onset", sudden(48)),
        "prune_60": ("60 of the 64 final LayerNorm gains pruned at the onset", sudden(60)),
        "prune_slow": (f"4 more final LayerNorm gains pruned every {every} steps, 60 after 15 times", slow),
    }


def record_seed(data: Any, probe: Probe, recipe: Recipe, seed: int) -> dict[str, Probes]:
    """The healthy run's probes and each collapse branch's probes after the onset."""
    training = Training(data, recipe, seed)
    healthy: Probes = [(0, kept(probe.run(training.model)))]
    snapshot = None
    for step in range(1, recipe.steps + 1):
        training.train_step(step)
        if recipe.recorded(step):
            healthy.append((step, kept(probe.run(training.model))))
        if step == recipe.onset:
            snapshot = copy.deepcopy(training)
    runs = {"healthy": healthy}
    for name, (_, perturb) in collapses(recipe).items():
        branch = copy.deepcopy(snapshot)
        runs[name] = []
        for i in range(1, recipe.after + 1):
            perturb(branch, i)
            branch.train_step(recipe.onset + i)
            if (recipe.onset + i) % recipe.every == 0:
                runs[name].append((recipe.onset + i, kept(probe.run(branch.model))))
    return runs


def record(recipe: Recipe) -> dict[str, dict[str, Probes]]:
    """Every seed's runs, keyed ``seed{n}`` then run name; prints the time of each seed."""
    with tempfile.TemporaryDirectory() as directory:
        data = prepare_data(directory, seq_len=recipe.seq_len, max_train_chars=recipe.max_train_chars)
        options = {"max_samples": recipe.samples, "max_length": recipe.seq_len, "batch_size": 16, "pack": True}
        probe = Probe(data.heldout_path, **options)
    recorded = {}
    for seed in range(recipe.seeds):
        started = time.perf_counter()
        recorded[f"seed{seed}"] = record_seed(data, probe, recipe, seed)
        print(f"seed {seed}: recorded in {time.perf_counter() - started:.0f} s")
    return recorded


def run_probes(recorded: dict[str, Probes], name: str, onset: int) -> Probes:
    """A run's probes in order: the healthy run's, or its probes up to the onset then the branch's."""
    before = [probe for probe in recorded["healthy"] if probe[0] <= onset or name == "healthy"]
    return before + ([] if name == "healthy" else recorded[name])


def schedule_steps(every: int, kind: str, last: int) -> set[int]:
    """The steps a monitor with ``every_n_steps=every`` and ``schedule=kind`` probes."""
    return set(range(0, last + 1, every)) | ({s for s in EARLY if s < every} if kind == "log" else set())


def replay(rule: CollapseAlert, probes: Probes, steps: set[int], every: int) -> tuple[list[Any], int]:
    """The alerts of ``rule`` over the probes at ``steps``, and how many probes it checked (from warm-up on)."""
    alarm, checked = Alarm(rule, every), 0
    for step, result in probes:
        if step in steps:
            checked += step >= alarm.warmup
            alarm.check(result, probes[0][1], step)  # the reference: the first probe, as in the monitor
    return alarm.alerts, checked


def rule_of(metric: str, k: float, min_drop: float, baseline: str, warmup: str) -> CollapseAlert:
    kind, window = BASELINES[baseline]
    return CollapseAlert(metric=metric, k=k, min_drop=min_drop, baseline=kind, window=window, warmup=WARMUPS[warmup])


def rules() -> list[tuple[str, float, float, str, str]]:
    return [(m, k, d, b, w) for m in GRID for b in BASELINES for w in WARMUPS for k in KS for d in GRID[m]]


def where(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [row for row in rows if all(row[key] == value for key, value in match.items())]


def markdown(header: list[str], rows: list[list[Any]]) -> None:
    print("\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    print("\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows))


def fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"


def false_alarms(recorded: dict[str, dict[str, Probes]], recipe: Recipe) -> list[dict[str, Any]]:
    """Per rule: alerts per healthy run (per seed), their steps and hidden states, alerts per 100 checked probes."""
    steps, rows = schedule_steps(recipe.every, "log", recipe.steps), []
    for key in rules():
        runs = [replay(rule_of(*key), seed["healthy"], steps, recipe.every) for seed in recorded.values()]
        alerts, checked = [len(found) for found, _ in runs], sum(count for _, count in runs)
        rows.append(
            dict(zip(FIELDS, key, strict=True))
            | {"alerts_per_run": alerts, "alerts": [[[a.step, a.layers] for a in found] for found, _ in runs]}
            | {"probes_checked": checked, "per_100_probes": 100 * sum(alerts) / max(1, checked)}
        )
    return rows


def critical_drop(
    recorded: dict[str, dict[str, Probes]], recipe: Recipe, key: tuple[str, float, str, str]
) -> tuple[float, float]:
    """The range of min_drop (0.005 steps) around the metric's default in which no healthy run alerts;
    (1, 1) when the default alerts. Scanned, not bisected: silence is not monotone in min_drop (an
    episode a smaller min_drop keeps open hides a fall a larger one announces; the default warm-up
    starts in one)."""
    metric, k, baseline, warmup = key
    steps = schedule_steps(recipe.every, "log", recipe.steps)

    def silent(milli: int) -> bool:
        rule = rule_of(metric, k, milli / 1000, baseline, warmup)
        return all(not replay(rule, seed["healthy"], steps, recipe.every)[0] for seed in recorded.values())

    start = round(1000 * CollapseAlert(metric=metric).drop)
    if not silent(start):
        return 1.0, 1.0
    low = next((m + 5 for m in range(start - 5, -1, -5) if not silent(m)), 0)
    high = next((m - 5 for m in range(start + 5, 1000, 5) if not silent(m)), 995)
    return low / 1000, high / 1000


def masked(rule: CollapseAlert, probes: Probes, steps: set[int], every: int, onset: int) -> bool:
    """A miss only because an episode was still on at the onset: armed just before it, the window rule detects."""
    if rule.baseline != "window":
        return False
    late = dataclasses.replace(rule, warmup=max(0, onset - rule.window * every))
    return any(alert.step > onset for alert in replay(late, probes, steps, every)[0])


def detections(recorded: dict[str, dict[str, Probes]], recipe: Recipe) -> list[dict[str, Any]]:
    """Per collapse, rule and seed: detected after the onset or not, the delay, the hidden states, the falls."""
    steps, rows, timing = schedule_steps(recipe.every, "log", recipe.steps), [], (recipe.every, recipe.onset)
    for name, key, (seed, runs) in itertools.product(collapses(recipe), rules(), recorded.items()):
        rule, probes = rule_of(*key), run_probes(runs, name, recipe.onset)
        first = next((a for a in replay(rule, probes, steps, recipe.every)[0] if a.step > recipe.onset), None)
        found = {"detected": first is not None, "masked": first is None and masked(rule, probes, steps, *timing)}
        if first is not None:
            delay = first.step - recipe.onset
            falls = [fall / before for fall, before in zip(first.falls, first.before, strict=True)]
            found |= {"delay_steps": delay, "delay_probes": delay // recipe.every, "layers": first.layers}
            found["relative_falls"] = falls
        rows.append(dict(zip(FIELDS, key, strict=True)) | {"collapse": name, "seed": seed} | found)
    return rows


def describe(recorded: dict[str, dict[str, Probes]], recipe: Recipe) -> list[dict[str, Any]]:
    """Per run: held-out loss, Matrix Entropy of the last hidden state early, at the onset, 1 and 10 probes on."""
    rows = []
    for name in ["healthy", *collapses(recipe)]:
        row: dict[str, Any] = {"run": name}
        for mark in (10, 20, 40, recipe.onset, recipe.onset + recipe.every, recipe.onset + 10 * recipe.every):
            found = [dict(run_probes(runs, name, recipe.onset)).get(mark) for runs in recorded.values()]
            found = [result for result in found if result is not None]
            row[f"loss@{mark}"] = statistics.fmean(r.loss for r in found) if found else math.nan
            last = [r.per_layer["matrix_entropy"][-1] for r in found]
            row[f"ME last@{mark}"] = statistics.fmean(last) if last else math.nan
        rows.append(row)
    print("\nThe runs (means over seeds): held-out loss, Matrix Entropy of the last hidden state")
    markdown(list(rows[0]), [[row["run"], *map(fmt, list(row.values())[1:])] for row in rows])
    return rows


def false_alarm_table(rows: list[dict[str, Any]], seeds: int) -> None:
    print(f"\nFalse alarms: alerts over the {seeds} healthy runs at k = 2 / 3 / 4; probes checked per run")
    for metric in GRID:
        table = []
        for baseline, warmup in itertools.product(BASELINES, WARMUPS):
            mine = where(rows, metric=metric, baseline=baseline, warmup=warmup)
            cells = [" / ".join(str(sum(r["alerts_per_run"])) for r in where(mine, min_drop=d)) for d in GRID[metric]]
            table.append([baseline, warmup, mine[0]["probes_checked"] // seeds, *cells])
        markdown([f"{SHORT[metric]}: baseline", "warmup", "probes", *map(str, GRID[metric])], table)


def critical_table(recorded: dict[str, dict[str, Probes]], recipe: Recipe) -> dict[str, float]:
    """The silent range of min_drop around the default per metric, baseline, warmup and k (0.005 steps)."""
    found, table = {}, []
    for metric, baseline, warmup in itertools.product(GRID, BASELINES, WARMUPS):
        values = [critical_drop(recorded, recipe, (metric, k, baseline, warmup)) for k in KS]
        found |= {f"{metric}/{baseline}/{warmup}/k{k}": v[0] for k, v in zip(KS, values, strict=True)}
        table.append([SHORT[metric], baseline, warmup, *(f"{low:.3f}-{high:.3f}" for low, high in values)])
    print("\nmin_drop without a false alarm on any healthy run, around the default (0.005 steps; 1: it alerts)")
    markdown(["metric", "baseline", "warmup", *(f"k = {k}" for k in KS)], table)
    return found


def warmup_table(recorded: dict[str, dict[str, Probes]], recipe: Recipe) -> list[dict[str, Any]]:
    """The current defaults on three schedules, each warm-up: alerts per healthy run and their steps."""
    rows, table = [], []
    for (kind, cadence), metric in itertools.product(
        (("fixed", recipe.every), ("log", recipe.every), ("log", 50)), GRID
    ):
        steps, cells = schedule_steps(cadence, kind, recipe.steps), []
        for warmup in WARMUPS.values():
            rule = CollapseAlert(metric=metric, warmup=warmup)
            found = [[a.step for a in replay(rule, runs["healthy"], steps, cadence)[0]] for runs in recorded.values()]
            rows.append({"schedule": f"{kind} {cadence}", "metric": metric, "warmup": warmup, "steps": found})
            cells.append("; ".join(",".join(map(str, f)) or "-" for f in found))
        table.append([f"{kind} {cadence}", f"{SHORT[metric]} {CollapseAlert(metric=metric).drop:g}", *cells])
    print("\nWarm-up: the current defaults (k = 3, window 1) on the healthy runs: alert steps per seed (-: none)")
    markdown(["schedule", "rule", *(f"warmup {w}" for w in WARMUPS)], table)
    return rows


def detection_cell(rows: list[dict[str, Any]]) -> str:
    """'seeds detected/seeds, median delay in probes', and 'm' per miss masked by an episode on at the onset."""
    hits = [r for r in rows if r["detected"]]
    delay = f", {statistics.median(r['delay_probes'] for r in hits):g}" if hits else ""
    return f"{len(hits)}/{len(rows)}{delay}" + " m" * sum(r["masked"] for r in rows)


def detection_table(rows: list[dict[str, Any]], warmup: str) -> None:
    print(f"\nDetection (k = 3, warmup {warmup}): seeds detected, median delay in probes after the onset")
    for metric in GRID:
        table = []
        for collapse, baseline in itertools.product(dict.fromkeys(r["collapse"] for r in rows), BASELINES):
            mine = where(rows, collapse=collapse, metric=metric, baseline=baseline, k=3, warmup=warmup)
            table.append([collapse, baseline, *(detection_cell(where(mine, min_drop=d)) for d in GRID[metric])])
        markdown(["collapse", f"{SHORT[metric]}: baseline", *map(str, GRID[metric])], table)


def recommend(found: list[dict[str, Any]], hits: list[dict[str, Any]], critical: dict[str, float]) -> dict[str, Any]:
    """Per metric at k = 3, window 1, the first warm-up (in WARMUPS' order) with a grid min_drop free of false
    alarms: its smallest such min_drop, the margin over the bisected threshold, the collapses' detection."""
    out = {}
    for metric, warmup in itertools.product(GRID, WARMUPS):
        mine = where(found, metric=metric, k=3, baseline="window 1", warmup=warmup)
        quiet = [r for r in mine if not sum(r["alerts_per_run"])]
        if metric in out or not quiet:
            continue
        drop, probes, runs = quiet[0]["min_drop"], quiet[0]["probes_checked"], len(mine[0]["alerts_per_run"])
        threshold = critical[f"{metric}/window 1/{warmup}/k3"]
        bound, per_run = (100 * stats.beta.ppf(0.95, 1, n) for n in (probes, runs))  # Clopper-Pearson, 0 of n
        print(
            f"\n{SHORT[metric]}, k = 3, window 1, warmup {warmup}: no false alarm from min_drop {threshold:.3f} on; "
            f"smallest grid value {drop:g} (margin {drop - threshold:.3f}); 0 of {probes} probes: "
            f"95% upper bound {bound:.2g} per 100 probes if independent; 0 of {runs} runs: below {per_run:.0f}% a run"
        )
        out[metric] = dict(warmup=warmup, min_drop=drop, threshold=threshold, per_100=bound, per_run=per_run)
        for collapse in dict.fromkeys(r["collapse"] for r in hits):
            rows = where(hits, collapse=collapse, metric=metric, k=3, min_drop=drop, baseline="window 1", warmup=warmup)
            falls = ", ".join(f"{max(r['relative_falls']):.0%}" for r in rows if r["detected"])
            layers = [r.get("layers") for r in rows]
            print(f"  {collapse}: {detection_cell(rows)}; hidden states {layers}; largest fall {falls}")
            out[metric][collapse] = rows
    return out


def convert(recorded: dict[str, dict[str, list]], result: Callable[[Any], Any]) -> dict[str, dict[str, list]]:
    """Every seed's runs with each probe's result converted: to its JSON form (``to_dict``) and back."""
    return {
        seed: {name: [(int(s), result(r)) for s, r in p] for name, p in runs.items()} for seed, runs in recorded.items()
    }


def recorded_runs(args: Any) -> tuple[Recipe, dict[str, dict[str, Probes]]]:
    """The runs of ``--replay``'s file, or recorded now."""
    if args.replay:
        with open(args.replay, encoding="utf-8") as handle:
            saved = json.load(handle)
        return Recipe(**saved["recipe"]), convert(saved["runs"], Replayed.from_dict)
    onset = args.steps // 2
    recipe = Recipe(steps=args.steps, onset=onset, after=min(200, args.steps - onset), seeds=args.seeds)
    return (QUICK, record(QUICK)) if args.quick else (recipe, record(recipe))


def main() -> None:
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster under load (0.15 s vs 0.4 s a step)
    parser = benchmark_parser(__doc__.splitlines()[0], device=False)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600, help="healthy run length; the onset is at half of it")
    parser.add_argument("--replay", help="replay the runs of a previous --json instead of training")
    args = parser.parse_args()
    print(f"machine: {machine(torch.device('cpu'))}")
    started = time.perf_counter()
    recipe, recorded = recorded_runs(args)
    print(f"recipe: {asdict(recipe)}; recorded in {time.perf_counter() - started:.0f} s")
    print("\n".join(f"  {name}: {what}" for name, (what, _) in collapses(recipe).items()))
    results = {"machine": machine(torch.device("cpu")), "recipe": asdict(recipe)}
    results["runs_described"] = describe(recorded, recipe)
    results["false_alarms"] = found = false_alarms(recorded, recipe)
    false_alarm_table(found, recipe.seeds)
    results["critical_min_drop"] = critical = critical_table(recorded, recipe)
    results["warmup"] = warmup_table(recorded, recipe)
    results["detections"] = hits = detections(recorded, recipe)
    results["recommended"] = recommended = recommend(found, hits, critical)
    detection_table(hits, next(iter(recommended.values()), {}).get("warmup", "default"))
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    save_results(args.json, results | {"runs": convert(recorded, ProbeResult.to_dict)})


if __name__ == "__main__":
    main()
