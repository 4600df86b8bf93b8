"""The search of `edgetok tune`: an Optuna multi-objective study (latency, accuracy loss) kept in the output
folder, its trials run on a Ray fleet (edgetok.tune.fleet).

Order of work, cheapest first: the dense export is trial 0 (the accuracy every loss is measured from); then
each method at the matched-GMACs points ``compare`` uses (65 % and 50 % of the dense GMACs), then what the
sampler proposes. Each trial is exported and evaluated on CPU workers; only a trial within the accuracy
budget that no profiled trial of the same precision, attention and plugins already beats on both GMACs and
accuracy loss is built and profiled on the target, since it is the only kind that can still join the front.

Resumable: the study is an SQLite file in the output folder (Optuna's RDB storage). A rerun with the same
settings continues: finished trials are not run again; a trial the previous run left running (Ctrl-C, SIGTERM,
a killed driver) is marked failed with the reason and its configuration queued again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from edgetok import atomic
from edgetok.errors import EdgetokError
from edgetok.tune import space as spaces
from edgetok.tune import trial as work

STUDY_NAME = "edgetok-tune"
STORAGE = "study.db"
SEED_FRACTIONS = (0.65, 0.5)  # compare's default GMACs targets (shares of the dense model's)


@dataclass
class TuneOptions:
    """A study. ``trials``: how many to run in all (reruns included); ``time_s``: stop starting new ones after
    this long (this run); with neither, 32 trials. ``workers``: CPU tasks at once (None: the cluster's CPUs)."""
    model: str
    data: str
    calibrate: str | None = None
    checkpoint: str | None = None
    max_drop: float = 1.0
    metric: str = "top1"
    target: str = "cpu"
    batch: int = 1
    trials: int | None = None
    time_s: float | None = None
    methods: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ("fp32",)
    attentions: tuple[str, ...] = ("dense",)
    plugins: tuple[bool, ...] = (False,)
    address: str | None = None
    output_dir: str = "edgetok-out/tune"
    workers: int | None = None
    duration_s: float = 2.0
    warmup_ms: float = 200.0
    target_timeout_s: float = 120.0
    cpu_stand_in: bool = False
    samples: int = 256
    seed: int = 0
    threads: int = 0

    def __post_init__(self):
        self.methods = tuple(self.methods) or spaces.parse_methods(None, self.calibrate)  # default: every method

    def settings(self) -> dict:
        """What a rerun must share with the run that made the study (the rest may change between runs)."""
        keep = ("model", "data", "calibrate", "checkpoint", "max_drop", "metric", "target", "batch", "methods",
                "precisions", "attentions", "plugins", "samples", "seed")
        values = {k: v for k, v in asdict(self).items() if k in keep}
        for key in ("data", "calibrate", "checkpoint"):
            if values[key]:
                values[key] = str(Path(values[key]).resolve())
        return json.loads(json.dumps(values))


DEFAULT_TRIALS = 32
MAX_REPEATS = 20


def _spec(opts: TuneOptions) -> dict:
    """What a worker needs besides the configuration (plain data, sent with every task)."""
    return {"model": opts.model, "checkpoint": opts.checkpoint, "data": str(Path(opts.data).resolve()),
            "calibrate": str(Path(opts.calibrate).resolve()) if opts.calibrate else None, "target": opts.target,
            "batch": opts.batch, "samples": opts.samples, "eval_batch": 64, "duration_s": opts.duration_s,
            "warmup_ms": opts.warmup_ms, "cpu_stand_in": opts.cpu_stand_in, "threads": opts.threads}


# ------------------------------------------------------------------------------------------ the space
def build_space(opts: TuneOptions) -> tuple[spaces.Space, dict]:
    """The space on this model (the knobs' bounds need its depth and tokens), and the dense model's facts."""
    from edgetok.plugins.block_sparse_attention import largest_block
    from edgetok.vit import methods as registry
    from edgetok.vit.flops import vit_macs
    from edgetok.vit.loading import load_vit
    from edgetok.vit.reduction import plan

    vit = load_vit(opts.model, opts.checkpoint)

    def fits(method: str):
        def check(setting: dict) -> bool:
            try:
                plan(vit, registry.make_method(method, vit.depth, tokens=vit.num_tokens,
                                               defaults=vit.method_defaults, **setting))
                return True
            except EdgetokError:
                return False
        return check

    free = vit.num_tokens - vit.prefix_tokens
    dims = {m: spaces.bounds(registry.get(m), vit.depth, free, fits(m)) for m in opts.methods}
    blocks = tuple(b for b in (16, 32, 64, 128, 256) if b <= largest_block(vit.num_tokens))
    space = spaces.Space(dims, opts.precisions, opts.attentions, opts.plugins, blocks)
    facts = {"vit": vit, "dense_gmacs": vit_macs(vit, plan(vit, None).tokens) / 1e9}
    return space, facts


def seed_points(opts: TuneOptions, space: spaces.Space, facts: dict) -> list[dict]:
    """Each method at compare's matched-GMACs points (its other options at their defaults), fp32 (or the first
    precision), dense attention, no plugins."""
    from edgetok.vit import methods as registry
    from edgetok.workflows.comparison import match

    points = []
    for fraction in SEED_FRACTIONS:
        for method in opts.methods:
            if registry.get(method).knob is None:
                continue
            found = match(facts["vit"], method, fraction * facts["dense_gmacs"])
            if found is None:
                continue
            setting, _ = found
            params = {"method": method, "precision": "fp32" if "fp32" in space.precisions else space.precisions[0],
                      "attention": "dense" if "dense" in space.attentions else space.attentions[0],
                      "plugins": False if False in space.plugins else space.plugins[0]}
            declared = registry.get(method)
            for d in space.methods[method]:  # the knob as matched, every other option at its default
                value = setting.get(d.name, declared.option(d.name).default)
                if value is not None:
                    params[f"{method}.{d.name}"] = int(value) if d.as_text else value
            if params not in points:
                points.append(params)
    return points


def suggest(trial, space: spaces.Space) -> dict:
    """A configuration from the sampler (or from an enqueued point, which fixes these same parameters)."""
    methods = list(space.methods)
    method = trial.suggest_categorical("method", methods)
    options = {}
    for d in space.methods[method]:
        name = f"{method}.{d.name}"
        if d.kind == "choice":
            value = trial.suggest_categorical(name, list(d.choices))
        elif d.kind == "int":
            value = trial.suggest_int(name, int(d.low), int(d.high))
            value = str(value) if d.as_text else value
        else:
            value = round(trial.suggest_float(name, d.low, d.high, step=d.step), 4)
        options[d.name] = value
    config = {"method": method, "options": options,
              "precision": trial.suggest_categorical("precision", list(space.precisions)),
              "attention": trial.suggest_categorical("attention", list(space.attentions)),
              "plugins": trial.suggest_categorical("plugins", list(space.plugins))}
    if config["attention"] == "sparse":
        config["attention_block"] = trial.suggest_categorical("attention_block", list(space.attention_blocks))
        config["attention_mass"] = round(trial.suggest_float("attention_mass", *spaces.SPARSE_MASS, step=0.01), 4)
    return config


DENSE = {"method": "none", "options": {}, "precision": "fp32", "attention": "dense", "plugins": False}


# ------------------------------------------------------------------------------------------ the study
def open_study(opts: TuneOptions, out: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(out / STORAGE).resolve()}")
    sampler = optuna.samplers.TPESampler(seed=opts.seed, n_startup_trials=4)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=["minimize", "minimize"],
                                sampler=sampler, load_if_exists=True)
    settings = opts.settings()
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", settings)
    elif recorded != settings:
        changed = sorted(k for k in settings if settings[k] != recorded.get(k))
        raise EdgetokError(f"-o {out} holds a study made with other settings ({', '.join(changed)}: "
                           f"{', '.join(f'{recorded.get(k)!r}' for k in changed)}); rerun with those, or give "
                           "another -o for a new study")
    return study


def recover(study) -> list[int]:
    """Trials a previous run left running (it was killed): marked failed with the reason, their
    configurations queued again. Returns their numbers."""
    from optuna.trial import TrialState

    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_user_attr(t._trial_id, "reason", "interrupted: the run stopped while this trial "
                                                                   "ran; its configuration was queued again")
        study.tell(t.number, state=TrialState.FAIL)
        if t.user_attrs.get("config", {}).get("method") != "none" and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        lost.append(t.number)
    return lost


def counted(study) -> list:
    """The trials that count towards --trials: all but those interrupted (their configuration runs again)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING
            and not t.user_attrs.get("interrupted")]


def loss_points(metric: str, accuracy: dict, dense_top1: float) -> float:
    """Accuracy loss in percentage points: top-1 below the dense export's, or top-1 disagreement with it."""
    if metric == "agreement":
        return round(100 * (1 - accuracy["reference"]["top1_agreement"]), 4)
    return round(100 * (dense_top1 - accuracy["top1"]), 4)


def _kind(config: dict) -> tuple:
    return (config["precision"], config["attention"], bool(config["plugins"]))


def dominated_by(candidate: dict, profiled: list[dict]) -> int | None:
    """A profiled trial of the same precision, attention and plugins with no more GMACs and no more loss:
    the candidate cannot be faster at no more loss, so it is not profiled (None: it may join the front)."""
    for other in profiled:
        if (_kind(other["config"]) == _kind(candidate["config"]) and other["gmacs"] <= candidate["gmacs"]
                and other["loss"] <= candidate["loss"]):
            return other["number"]
    return None


def run_study(opts: TuneOptions, say: Callable[[str], None] = lambda s: None,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """Run (or continue) the study in ``opts.output_dir`` and write its reports; returns every trial as
    tune.json records it. ``say``: notes; ``progress``: the live line (done, running, failed, best)."""
    from optuna.trial import TrialState

    from edgetok.tune import report
    from edgetok.tune.fleet import Fleet, failure_reason

    out = Path(opts.output_dir)
    if (out / STORAGE).is_file():
        open_study(opts, out)  # a study of other settings is refused before anything starts
    say(f"loading {opts.model} for the search space")
    space, facts = build_space(opts)
    budget = opts.trials if opts.trials is not None else (None if opts.time_s else DEFAULT_TRIALS)
    deadline = time.monotonic() + opts.time_s if opts.time_s else math.inf
    spec = _spec(opts)
    fleet = Fleet(opts.address, opts.target, opts.workers, say)
    try:
        units = fleet.wait_for_target(opts.target_timeout_s, say)  # before anything is written
        out.mkdir(parents=True, exist_ok=True)
        study = open_study(opts, out)
    except BaseException:
        fleet.close()
        raise
    run = int(study.user_attrs.get("runs", 0)) + 1
    study.set_user_attr("runs", run)
    lost = recover(study)
    if lost:
        say(f"the previous run left trial(s) {', '.join(map(str, lost))} running: marked failed, queued again")
    seeding = not study.trials
    inflight: dict = {}  # ref -> (kind, optuna trial number, extra)
    waiting: list = []  # (number, config, files ref, artifact): within budget, not beaten, to build and profile
    alone = opts.target == "cpu"  # the CPU is the device: it profiles with no export or eval beside it
    started = time.monotonic()

    def records() -> list[dict]:
        return report.trials(study)

    def update() -> None:
        trials = records()
        report.write(out, study, trials, opts, facts["dense_gmacs"], final=False)
        if progress:
            progress(report.progress_line(trials, budget, len(inflight) + len(waiting), opts.max_drop))

    def finish(number: int, state, reason: str | None = None, values=None, **attrs) -> None:
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        for key, value in attrs.items():
            study._storage.set_trial_user_attr(trial_id, key, value)
        if reason:
            study._storage.set_trial_user_attr(trial_id, "reason", reason)
        study.tell(number, values=values, state=state)

    try:
        fleet.start_profilers(units)
        dense = _dense_trial(study)
        if dense is None:  # trial 0: the reference every loss is measured from, alone before the others
            t = study.ask()
            fixed = study._storage.get_trial_system_attrs(t._trial_id).get("fixed_params")
            if fixed:  # it took a queued configuration: queue that again
                study.enqueue_trial(fixed, user_attrs={"retry_of": t.number})
            t.set_user_attr("config", DENSE)
            t.set_user_attr("label", spaces.config_label(DENSE))
            t.set_user_attr("run", run)
            inflight[fleet.prepare(DENSE, spec)] = ("prepare", t.number, DENSE)
        if seeding:
            for params in seed_points(opts, space, facts):
                study.enqueue_trial(params, user_attrs={"seeded": "compare's matched-GMACs point"})
        reference = None
        changed = True
        repeats = 0  # proposals in a row that repeat a tried configuration: the space is used up
        while True:
            dense = _dense_trial(study)
            if dense is not None and dense.state == TrialState.FAIL and not dense.user_attrs.get("interrupted"):
                raise EdgetokError(f"the dense export of {opts.model} failed, so no loss can be measured: "
                                   f"{dense.user_attrs.get('reason')}")
            ready_for_more = dense is not None and dense.user_attrs.get("accuracy") is not None
            if ready_for_more and reference is None and opts.metric == "agreement":
                reference = fleet.put(_dense_files(out, dense))
            kinds = [k[0] for k in inflight.values()]
            while waiting and (not alone or not kinds):
                number, config, files, artifact = waiting.pop(0)
                a = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
                    study._study_id, number)).user_attrs
                if _beaten(study, number, config, a["loss"], (a.get("flops") or {}).get("reduced_gmacs"), finish):
                    changed = True
                    continue  # a trial profiled while this one waited beats it
                ref, index = fleet.measure(config, spec, files, artifact)
                inflight[ref] = ("measure", number, (config, index))
                kinds.append("measure")
            paused = alone and (waiting or "measure" in kinds)
            while (ready_for_more and not paused and kinds.count("prepare") < fleet.workers and repeats < MAX_REPEATS
                   and (budget is None or len(counted(study)) < budget) and time.monotonic() < deadline):
                t = study.ask()
                config = suggest(t, space)
                t.set_user_attr("config", config)
                t.set_user_attr("label", spaces.config_label(config))
                t.set_user_attr("run", run)
                same = _same_config(study, config, t.number)
                if same is not None:
                    finish(t.number, TrialState.PRUNED, f"same configuration as trial {same}; not run again",
                           duplicate_of=same)
                    repeats += 1
                    if repeats == MAX_REPEATS:
                        say(f"the sampler proposed {MAX_REPEATS} tried configurations in a row: the space looks "
                            "used up; stopping")
                    continue
                repeats = 0
                inflight[fleet.prepare(config, spec, reference)] = ("prepare", t.number, config)
                kinds.append("prepare")
                changed = True
            if changed:
                update()
                changed = False
            if not inflight and not waiting:
                break
            for ref in fleet.wait(list(inflight), 1.0):
                changed = True
                kind, number, extra = inflight.pop(ref)
                try:
                    result = fleet.get(ref)
                except Exception as exc:  # the task failed (its error) or its worker died past the retries
                    if kind == "measure":
                        fleet.measured(extra[1])
                    finish(number, TrialState.FAIL, failure_reason(exc), failed_in=kind)
                    continue
                if kind == "prepare":
                    _prepared(study, out, number, extra, result, opts, fleet, waiting, finish)
                else:
                    fleet.measured(extra[1])
                    _measured(number, result, finish, study)
        if progress:
            progress(report.progress_line(records(), budget, 0, opts.max_drop))
        trials = records()
        report.write(out, study, trials, opts, facts["dense_gmacs"], final=True)
        say(f"{len(trials)} trials in {out} ({time.monotonic() - started:.0f} s this run)")
        return trials
    except BaseException:
        running = [number for _, number, _ in inflight.values()] + [w[0] for w in waiting]
        for number in running:  # Ctrl-C, SIGTERM: what ran is queued again
            try:
                finish(number, TrialState.FAIL, "interrupted: the run stopped while this trial ran; its configuration "
                                                "is queued again", interrupted=True)
                params = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
                    study._study_id, number)).params
                if params:
                    study.enqueue_trial(params, user_attrs={"retry_of": number})
            except Exception:
                pass
        fleet.cancel(list(inflight))
        try:
            report.write(out, study, records(), opts, facts["dense_gmacs"], final=False)
        except Exception:
            pass
        raise
    finally:
        fleet.close()


def _dense_trial(study):
    return next((t for t in study.get_trials(deepcopy=False)
                 if t.user_attrs.get("config", {}).get("method") == "none" and not t.user_attrs.get("interrupted")),
                None)


def _same_config(study, config: dict, number: int) -> int | None:
    for t in study.get_trials(deepcopy=False):
        if t.number != number and not t.user_attrs.get("interrupted") and t.user_attrs.get("config") == config:
            return t.number
    return None


def trial_folder(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:04d}"


def _dense_files(out: Path, dense) -> dict:
    """The dense trial's files, read back from the output folder and checked against tune's record."""
    folder = trial_folder(out, dense.number)
    files = {}
    for item in dense.user_attrs["artifacts"]:
        data = (folder / item["file"]).read_bytes()
        if work.sha256(data) != item["sha256"]:
            raise EdgetokError(f"{folder / item['file']} changed since trial {dense.number} wrote it (SHA-256 differs); "
                               "use a new -o")
        files[item["file"]] = {"bytes": data, "sha256": item["sha256"]}
    return {"files": files, "artifact": dense.user_attrs["artifact"]}


def _save(out: Path, number: int, files: dict) -> list[dict]:
    """The trial's files into trials/NNNN/, each checked against the SHA-256 its worker computed."""
    folder = trial_folder(out, number)
    with atomic.staging_dir(folder) as stage:
        work.unpack(files, stage / folder.name)
        atomic.publish_folder(stage / folder.name, folder)
    return [{"file": name, "sha256": item["sha256"], "bytes": len(item["bytes"])} for name, item in files.items()]


def _prepared(study, out: Path, number: int, config: dict, result: dict, opts: TuneOptions, fleet, waiting: list,
              finish) -> None:
    """After export and eval: keep the files, then profile, or stop (over the budget, or already beaten)."""
    from optuna.trial import TrialState

    artifacts = _save(out, number, result["files"])
    attrs = dict(artifacts=artifacts, artifact=result["artifact"], accuracy=result["accuracy"], flops=result["flops"],
                 tokens_per_layer=result["tokens_per_layer"], quantization=result["quantization"],
                 prepare_node=result["node"], prepare_seconds=result["seconds"])
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    for key, value in attrs.items():
        study._storage.set_trial_user_attr(trial_id, key, value)
    if config["method"] == "none":
        dense_top1 = result["accuracy"]["top1"]
        study.set_user_attr("dense_top1", dense_top1)
    dense_top1 = study.user_attrs["dense_top1"]
    loss = 0.0 if config["method"] == "none" else loss_points(opts.metric, result["accuracy"], dense_top1)
    study._storage.set_trial_user_attr(trial_id, "loss", loss)
    gmacs = result["flops"].get("reduced_gmacs")
    if loss > opts.max_drop:
        finish(number, TrialState.PRUNED, f"over the accuracy budget: loses {loss:.2f} points (--max-drop "
                                          f"{opts.max_drop:g}); not profiled")
        return
    if not _beaten(study, number, config, loss, gmacs, finish):
        waiting.append((number, config, fleet.put(result["files"]), result["artifact"]))


def _beaten(study, number: int, config: dict, loss: float, gmacs: float | None, finish) -> bool:
    """Whether a profiled trial already beats this one (then it is told as not profiled, with the reason)."""
    from optuna.trial import TrialState

    profiled = [{"number": t.number, "config": t.user_attrs["config"], "loss": t.user_attrs["loss"],
                 "gmacs": (t.user_attrs.get("flops") or {}).get("reduced_gmacs", math.inf)}
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    beaten = dominated_by({"config": config, "loss": loss, "gmacs": gmacs if gmacs is not None else math.inf},
                          profiled)
    if beaten is None:
        return False
    finish(number, TrialState.PRUNED, f"not profiled: trial {beaten} (same precision, attention and plugins) has no "
                                      "more GMACs and no more loss, so this one cannot join the front",
           dominated_by=beaten)
    return True


def _measured(number: int, result: dict, finish, study) -> None:
    from optuna.trial import TrialState

    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    loss = study._storage.get_trial(trial_id).user_attrs["loss"]
    finish(number, TrialState.COMPLETE, values=[result["latency_ms"]["median"], loss],
           latency_ms=result["latency_ms"], throughput=result["throughput"], device=result["device"],
           profile_node=result["node"], build=result["build"], runner=result["runner"],
           profile_seconds=result["seconds"], profile_batch=result["batch"])
