"""One record per experiment kind, registered once.

An `Experiment` says everything the rest of the toolkit needs to know about a kind of result: the
library function that makes it (its keyword arguments are the study's options), how its rows are
grouped and which column is averaged, the label of that value, whether the papers average it over the
correctly answered samples, how `Result.plot` draws it (`Plot`), how a study runs it on one sample
(`run`) and what the report calls it (`Report`). `patching.methods` registers every record in one
list; `Result`, the figures, the study runner, its statistics, its report and the CLI read them from
here, so a new experiment is one new file (its function and its record) plus one line in that list.

    from patching.engine.experiment import get, names
    get("knockout").value          # "rel_change"
    names(study=True)              # the experiments a study can run

Nothing here imports a method, a picture or an app: records are registered into it from above, and
the figures register how they draw (`register_drawer`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

SUBSETS = ("correct", "all")
OUTCOMES = ("continuous", "binary")
# what a study passes an experiment's function itself: never an option
RESERVED = frozenset({"model", "inputs", "answers", "tm", "progress", "result"})


@dataclass(frozen=True)
class Plot:
    """How `Result.plot` draws a kind (read by `patching.figures`). `style`: "lines" (the mean of the
    value against `x`, one line per `series`, one panel per `panel` value), "traced" (per-position
    or per-head heatmaps where the rows have them, else lines by token set per restore site),
    "heads" (layer x head heatmaps, one per `panel` value), "accuracy" (accuracy per `series` against
    `x` with Wilson bands), "bars" (one bar per `series`), "points" (the value against the FLOPs
    saved, one point per `series`) or "scatter" (one point per row against `x`). `xlabel` names the
    x axis; `window` adds the knockout window to the title.

        register(Experiment("lens_by_rank", logit_lens, by=("group", "layer"), value="rank",
                            plot=Plot("lines", x="layer", series="group", xlabel="layer")))
        Result("lens_by_rank", logit_lens(model, inputs, [answer]).df).plot()
    """

    style: str
    x: str | None = None
    series: str | None = None
    panel: str | None = None
    xlabel: str | None = None
    window: bool = False


@dataclass(frozen=True)
class Report:
    """How a study's report shows a kind: its `heading`; `split`, columns drawn as panels of their
    own (besides the study's facet); `by_site`, one column of panels per restore site; `twin`, a
    second axis `(column, label)`; `samples`, whether faint per-sample lines are drawn; `derived`,
    kinds computed from these rows and drawn after them; `table`, "cells" (the summary's rows),
    "lowest" (each edge's lowest point of the mean curve) or "shares" (the share of samples per
    label); `baseline`, a column whose summary is tabled beside the value as the plain run's.

        report = Report("Logit lens: rank of the answer per token group", split=("lens",))
        record = Experiment("lens_by_rank", logit_lens, by=("group", "layer"), value="rank", report=report)
    """

    heading: str
    split: tuple[str, ...] = ()
    by_site: bool = False
    twin: tuple[str, str] | None = None
    samples: bool = True
    derived: tuple[str, ...] = ()
    table: str = "cells"
    baseline: str | None = None
    ylabel: str | None = None
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class Experiment:
    """One kind of result. `name`: the `Result.kind` and the study's experiment name. `fn`: the library
    function (None for kinds a study computes itself); its keyword arguments with defaults are the
    study's options, less `not_options`, plus `extra_options`, with `required` ones always asked for.
    `by` / `value`: `Result.mean`'s default grouping and value; `label`: the axis label of `value`;
    `correct_only`: averaged over the correctly answered samples by default (the papers' convention
    for knockout and causal tracing); `outcome`: "binary" when `summary_value` is 0/1 per sample (an
    accuracy; its interval is Wilson's, its paired test McNemar's), else "continuous" (a bootstrap
    interval, the sign test of the per-sample effect: `patching.engine.stats`); `paired`: the
    (intervention, plain run) columns of a row a cell is tested on, sample by sample (None: no
    paired test; for a continuous outcome `summary_value` is the per-sample effect between them);
    `unit`: "probability" or "percent" (a relative change of a probability) when the value has a
    numerical floor (`stats.numerical_floor`), with `unit_scale(options)` its multiple of that unit
    under a study's options (causal tracing's `scale`). `run(sample, options)`: the study's adaptor, rows for one
    `StudySample`; `cells` / `study_value`: the columns that name a cell of the study's summary and the
    value it averages (default `value`); `summary_rows(rows)`: the rows that summary averages where they
    are not the rows as written (dominance: one 0/1 share per label); `check(options, window, cfg)`:
    refuses settings before a model loads (`cfg`: the model's `HookedAVConfig`, read from its
    config.json without weights, or None); `columns`: every column its study rows may hold (a study
    refuses metadata of those names before a model loads); `plot`, `report`: see `Plot`, `Report`; `plan(sample, options)`: a `Cost`,
    what `run` will cost on that `StudySample`, counted from its TokenMap and the model's config without
    running anything (the model may sit on the meta device; `hooked-av study --plan`).


        record = Experiment("lens_by_rank", logit_lens, by=("group", "layer"), value="rank", label="rank of the answer")
        record.option_names()  # the options a study may give it: ['groups', 'lens', 'site']
    """

    name: str
    fn: Callable | None = None
    by: tuple[str, ...] = ("layer",)
    value: str = "value"
    label: str | None = None
    correct_only: bool = False
    outcome: str = "continuous"
    plot: Plot | None = None
    run: Callable | None = None
    cells: tuple[str, ...] = ()
    study_value: str | None = None
    report: Report | None = None
    extra_options: frozenset = field(default_factory=frozenset)
    not_options: frozenset = field(default_factory=frozenset)
    required: tuple[str, ...] = ()
    example: dict = field(default_factory=dict)  # a valid option set, quoted when a required option is missing
    check: Callable | None = None  # check(options, window, cfg): refuse settings before a model loads
    summary_rows: Callable | None = None  # rows -> the rows a study's summary averages (default: as written)
    # every column its study rows may hold, under any options (and its summary_rows'), besides what the runner
    # adds (id, metadata, sample_correct): a manifest's metadata of these names is refused before a model loads
    columns: tuple[str, ...] = ()
    paired: tuple[str, str] | None = None  # (intervention, plain run) columns a cell's paired test compares
    unit: str | None = None  # "probability" / "percent": the value's numerical floor (patching.engine.stats)
    unit_scale: Callable | None = None  # unit_scale(options) -> the value's multiple of `unit` (default 1)
    plan: Callable | None = None  # plan(sample, options) -> Cost: what `run` will cost, counted without running

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError(f"{self.name}: outcome must be one of {OUTCOMES}, got {self.outcome!r}")

    @property
    def summary_value(self) -> str:
        return self.study_value or self.value

    def outcome_of(self, column: str, values=None) -> str:
        """The outcome of `column`: the record's `outcome` for its summary value; else "binary" for a
        boolean column (`values`, its data), "continuous" otherwise (discarding plots p(answer),
        continuous, and summarises `correct`, binary)."""
        if column == self.summary_value:
            return self.outcome
        return "binary" if values is not None and getattr(values, "dtype", None) == bool else "continuous"

    @property
    def subset(self) -> str:
        """The samples its figures and tables average over by default: "correct" or "all"."""
        return "correct" if self.correct_only else "all"

    def option_names(self) -> list[str]:
        """The options a study may give it: its function's keyword arguments with a default (and the
        required ones), less what the study passes itself and `not_options`, plus `extra_options`."""
        if self.fn is None:
            return sorted(self.extra_options)
        params = inspect.signature(self.fn).parameters
        lib = {n for n, p in params.items() if p.default is not inspect.Parameter.empty or n in self.required}
        return sorted((lib - RESERVED - self.not_options) | self.extra_options)


@dataclass(frozen=True)
class Cost:
    """What an experiment costs on one sample, counted before it runs: `flops` (its language-model work,
    `patching.engine.cost`; towers not counted: a study runs them once per sample), `forwards` (that work in
    plain forwards of the sample reading the last logits) and `peak_bytes` (the widest run's tensors besides
    the weights, `cost.run_bytes`).

        Cost(flops=2.4e12, forwards=1.17, peak_bytes=150 * 2**20)
    """

    flops: float
    forwards: float
    peak_bytes: int


@dataclass
class StudySample:
    """What a study hands an experiment's `run` for one sample: `inputs` (processor-style, on the
    device), `enc` (`model.encode`'s output: the towers ran once), `tm` (its TokenMap), `answer` (the
    scored answer token id), `window` (the study's knockout window), `first` (the first sample this
    run processes: settings only data can check are refused there, before the rest is spent).

        from patching.engine.experiment import get
        x = StudySample(model, inputs, model.encode(**inputs), tm, answer, window=1)
        get("knockout").run(x, {"centres": [1]})  # the knockout rows a study writes for this sample
    """

    model: object
    inputs: dict
    enc: dict
    tm: object
    answer: int
    window: int | None
    first: bool = False


_REGISTRY: dict[str, Experiment] = {}
_DRAWERS: list[Callable] = []


def register(*records: Experiment) -> tuple[Experiment, ...]:
    """Register records (`patching.methods` does, once, in one list). A name registered twice is refused.

        lens_by_rank = Experiment("lens_by_rank", logit_lens, by=("group", "layer"), value="rank", label="rank of the answer")
        register(lens_by_rank)
        Result("lens_by_rank", logit_lens(model, inputs, [answer]).df).mean()  # by group and layer, as registered
    """
    for r in records:
        if not isinstance(r, Experiment):
            raise TypeError(f"register takes Experiment records, got {type(r).__name__}")
        if r.name in _REGISTRY and _REGISTRY[r.name] is not r:
            raise ValueError(f"an experiment named {r.name!r} is already registered")
        _REGISTRY[r.name] = r
    return records


def get(name: str) -> Experiment:
    """The record of `name`; an unknown name is a ValueError listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"no experiment kind {name!r}; known kinds: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def known(name: str) -> bool:
    return name in _REGISTRY


def names(study: bool = False, plotted: bool = False) -> list[str]:
    """Registered kinds in registration order: those a study can run (`study`: accuracy and every kind
    with a `run`), or those with a figure (`plotted`)."""
    out = list(_REGISTRY)
    if study:
        out = [n for n in out if n == "accuracy" or _REGISTRY[n].run is not None]
    if plotted:
        out = [n for n in out if _REGISTRY[n].plot is not None]
    return out


def study_experiments(experiments) -> list[str]:
    """The experiments a study runs, checked: accuracy first (every result needs each sample's correctness),
    then each given name once; a name no record a study can run has is refused, naming those it can."""
    from patching.engine.checks import nonempty

    experiments = nonempty(experiments, "experiments")
    known = names(study=True)
    unknown = [e for e in experiments if e not in known]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; choose from {known}")
    return ["accuracy"] + [e for e in dict.fromkeys(experiments) if e != "accuracy"]


def register_drawer(fn: Callable) -> Callable:
    """How results are drawn, registered by `patching.figures` (this layer imports no picture)."""
    _DRAWERS[:] = [fn]
    return fn


def draw(result, **kwargs):
    """`Result.plot`: the registered drawer's figure of `result`."""
    if not _DRAWERS:  # `import patching` registers it; only a broken install lacks it
        raise RuntimeError("no figure drawer is registered: import patching (patching.figures registers it)")
    return _DRAWERS[0](result, **kwargs)


def check_options(options: dict | None, experiments: list[str], window: int | None = None, cfg=None) -> dict:
    """Refuse, before a model loads, options for experiments not run, names an experiment does not
    take, nested `sinks` options `find_sinks` does not take, missing required ones, and what a record's
    own `check` refuses against the model's config `cfg` when given (the knockout window for its
    style and the model's depth, a sink threshold the model's width cannot reach)."""
    options = dict(options or {})
    stray = [k for k in options if k not in experiments]
    if stray:
        raise ValueError(f"options for {stray}, which this study does not run ({experiments}); drop them or add the experiment")
    for exp, kw in options.items():
        if not isinstance(kw, dict):
            raise ValueError(f"options[{exp!r}] must be a mapping of option names to values, got {kw!r}")
        if exp == "accuracy":
            if kw:
                raise ValueError("accuracy takes no options (the scoring rule is the study's scoring=)")
            continue
        record = get(exp)
        allowed = record.option_names()
        bad = sorted(set(kw) - set(allowed))
        if bad:
            owned = sorted(set(bad) & (RESERVED | record.not_options))
            why = f" ({owned} the study sets itself; the knockout window is the study's window=)" if owned else ""
            raise ValueError(f"{exp} takes no option(s) {bad}{why}; its options: {allowed}")
        nested = kw.get("sinks")
        if "sinks" in record.extra_options and nested is not None:
            if not isinstance(nested, dict):
                raise ValueError(f"{exp}.sinks holds find_sinks options as a mapping (e.g. {{\"tau\": 3}}), got {nested!r}")
            sink_options = get("sinks").option_names()
            bad = sorted(set(nested) - set(sink_options))
            if bad:
                raise ValueError(f"{exp}.sinks: find_sinks takes no option(s) {bad}; its options: {sink_options}")
            if get("sinks").check is not None:  # the sinks it finds follow the same thresholds
                try:
                    _check(get("sinks"), nested, window, cfg)
                except ValueError as e:
                    raise ValueError(f"{exp}.{e}") from None
    for exp in experiments:
        if exp == "accuracy":
            continue
        record = get(exp)
        missing = [k for k in record.required if k not in options.get(exp, {})]
        if missing:
            example = ", ".join(f"{exp}.{k}={v}" for k, v in record.example.items())
            raise ValueError(f"{exp} needs the option(s) {missing}" + (f", e.g. {example}" if example else ""))
        if cfg is not None:
            _layer_options(exp, options.get(exp, {}), cfg.n_layers)
        if record.check is not None:
            _check(record, options.get(exp, {}), window, cfg)
    return options


# options that name layers, with the range a model of L layers allows (discarding from L discards nothing)
LAYER_OPTIONS = {"layers": 0, "centres": 0, "from_layers": 1}


def _layer_options(exp: str, kw: dict, n_layers: int) -> None:
    """Layers named in options (`layers`, `centres`, `from_layers`, the effective pathway's `keep`
    triples, FastV's `k`) against the model's depth, before its weights load."""
    from patching.engine import checks

    named = {k: v for k, v in kw.items() if k in LAYER_OPTIONS and v is not None}
    if exp == "pathway" and isinstance(kw.get("keep"), list):
        named["keep"] = [layer for t in kw["keep"] if isinstance(t, (list, tuple)) and len(t) == 3 for layer in (t[2] or [])]
    try:
        for name, values in named.items():
            values = [values] if isinstance(values, int) else values
            extra = LAYER_OPTIONS.get(name, 0)
            checks.indices(values, n_layers + extra, f"{exp}.{name}", "layers",
                           valid=f"the model has {n_layers} layers: 0..{n_layers - 1 + extra}" + (f" ({n_layers} = none)" if extra else ""))
        if exp == "fastv" and kw.get("k") is not None:
            valid = f"k must be in 1..{n_layers - 1}: layer k-1's attention ranks the tokens"
            if checks.indices([kw["k"]], n_layers, f"{exp}.k", "layers", valid=valid) == [0]:
                raise ValueError(f"{exp}.k [0] out of range; {valid}")
    except ValueError as e:
        raise ValueError(f"{e} (checked against the model's config before its weights load)") from None


def _check(record: Experiment, options: dict, window, cfg) -> None:
    """`record.check(options, window, cfg)`; a check written as `check(options, window)` (before the
    config was passed) is called without it."""
    if len(inspect.signature(record.check).parameters) >= 3:
        record.check(options, window, cfg)
    else:
        record.check(options, window)
