"""Hooks: select modules by name, capture what they compute, reduce it on the device.

    specs = parse_layers(["encoder_blocks.*", "decoder_norm@input", "re:.*attn$:0"], model)
    with Capture(model, specs) as cap:
        cap.start_batch()
        model(**batch)                 # hooks fill cap.outputs
        tensors = cap.finish_batch()   # {name: reduced tensor}, every module checked

A pattern is an exact module name, a glob (`*` = one name component, `**` = any depth) or a
regular expression (`re:...`). `@input` captures the module's first input instead of its
output; `:0` or `:key` picks an element of a tuple, list or dict output. `METHOD()` or
`MODULE.METHOD()` captures what a method returns (MAR's `random_masking()`: the mask), the
method wrapped on the instance meanwhile. A capture is what the hook saw, even when the model
changes the tensor in place afterwards. Hooks (and wrappers) are removed on every exit path,
exceptions and KeyboardInterrupt included.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import inspect
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from marstore.errors import MarstoreError
from marstore.loading import module_aliases, named_modules

log = logging.getLogger(__name__)

REDUCTIONS = ("none", "mean", "first", "last")
MULTI_FIRE = ("error", "first", "last", "stack")


class HookError(MarstoreError):
    """A layer pattern, capture or firing problem; the message names the module and the fix."""


class StopForward(BaseException):
    """Raised inside the forward once every hooked module has fired (stop_early). Control flow,
    not an error: a BaseException, so that a model's own `except Exception` lets it through."""


_LAYOUT_EXAMPLES = ("write the module's batch axis as einops does: '(b k)' for k rows a sample, sample-major; "
                    "'(k b)' for k copies of the batch one after another (x.repeat(k, 1)); '(m=4 b t)' for "
                    "MAR's diffusion loss, which repeats its B*t token rows 4 times")


@dataclass(frozen=True)
class UnfoldLayout:
    """How a module that runs on several rows a sample folded them into its batch axis, in
    einops' notation: b is the batch, the other axes keep their order after it, so that
    (m b t) is stored as (B, m, t, ...). Sizes may be given (m=4); all but one must be.
    The default, (b k), takes the rows as sample-major, as a reshape of (B, k, ...) makes
    them (UVA's action head); MAR's diffusion loss repeats its B*t token rows with
    x.repeat(m, 1), which is (m b t)."""

    axes: tuple[tuple[str, int | None], ...]

    @classmethod
    def parse(cls, text: str) -> "UnfoldLayout":
        def bad(why: str) -> HookError:
            return HookError(f"unfold layout {text!r}: {why}; {_LAYOUT_EXAMPLES}")

        inner = re.fullmatch(r"\s*\((.*)\)\s*", text)
        if inner is None:
            raise bad("not in parentheses")
        axes = []
        for word in inner.group(1).split():
            m = re.fullmatch(r"([A-Za-z_]\w*)(?:=(\d+))?", word)
            if m is None or (m.group(2) is not None and int(m.group(2)) < 1):
                raise bad(f"{word!r} is neither an axis name nor name=size with a size of at least 1")
            axes.append((m.group(1), None if m.group(2) is None else int(m.group(2))))
        names = [name for name, _ in axes]
        if names.count("b") != 1:
            raise bad("it must name the batch axis b once")
        if dict(axes)["b"] is not None:
            raise bad("the batch axis b takes the batch's size; give sizes to the other axes")
        if len(set(names)) != len(names) or len(names) < 2:
            raise bad("each axis once, and at least one beside b" if len(names) > 1 else "nothing to unfold beside b")
        if sum(size is None for _, size in axes) > 2:
            raise bad("give the sizes of all its axes but one beside b (m=4)")
        return cls(tuple(axes))

    def __str__(self) -> str:
        return "(" + " ".join(name if size is None else f"{name}={size}" for name, size in self.axes) + ")"

    def sizes(self, rows: int, samples: int) -> list[int]:
        """Each axis's size for a module's `rows` leading rows from a batch of `samples`; a
        HookError where they do not fit."""
        given = math.prod(size for name, size in self.axes if name != "b" and size is not None)
        per_sample, unknown = rows // samples, [n for n, size in self.axes if size is None and n != "b"]
        if rows % samples or per_sample % given or (not unknown and per_sample != given):
            raise HookError(f"{rows} leading rows for a batch of {samples} samples do not unfold as {self}: "
                            f"{per_sample if rows % samples == 0 else rows / samples:g} a sample, the layout gives "
                            f"{'a multiple of ' if unknown else ''}{given}")
        return [samples if name == "b" else per_sample // given if size is None else size for name, size in self.axes]

    @property
    def per_sample(self) -> int:
        """The module's rows a sample, of a layout with every size given."""
        return math.prod(size for name, size in self.axes if name != "b")

    def resolved(self, rows: int, samples: int) -> "UnfoldLayout":
        """This layout with every size given: what the store records."""
        sizes = self.sizes(rows, samples)
        return UnfoldLayout(tuple((name, None if name == "b" else size) for (name, _), size in zip(self.axes, sizes)))

    def unfold(self, value: torch.Tensor, samples: int) -> torch.Tensor:
        """(rows, ...) -> (samples, <the other axes in order>, ...): a view."""
        sizes = self.sizes(value.shape[0], samples)
        batch_axis = [name for name, _ in self.axes].index("b")
        return value.reshape(*sizes, *value.shape[1:]).movedim(batch_axis, 0)


SAMPLE_MAJOR = UnfoldLayout((("b", None), ("k", None)))


def recorded_unfold(per_sample: int | None, layout: str | None) -> str | None:
    """The unfold layout a store or a probe records; sample-major where it records k alone
    (files written before layouts were)."""
    return layout or (f"(b k={per_sample})" if per_sample else None)


def unfolded_text(per_sample: int | None, layout: str | None) -> str:
    """', unfolded from 4 rows a sample', with the layout where it is not sample-major."""
    if not per_sample:
        return ""
    axes = UnfoldLayout.parse(layout).axes if layout else ()
    shown = len(axes) > 2 or (len(axes) == 2 and axes[0][0] != "b")
    return f", unfolded from {per_sample} rows a sample" + (f" as {layout}" if shown else "")


@dataclass
class LayerSelection:
    name: str  # module name in named_modules() ("" for the model itself, whose methods may be captured)
    capture: str = "output"  # or "input", or "return": the return value of the module's method
    element: int | str | None = None
    reduction: str | list[int] = "none"
    store_name: str = ""
    channels_first: bool = False  # (batch, channels, *positions), as convolutions give: reduce the positions
    unfold: UnfoldLayout | None = None  # how a module with several rows a sample folded them into its batch
    method: str | None = None  # capture "return": the method's name
    batch_axis: int = 0  # 1: the tensor is (sequence, batch, ...), as torch's sequence modules give without batch_first
    inner: tuple[int | str, ...] = ()  # elements picked inside the element: 'lstm:1:0', an LSTM's h_n
    # an unrecognised block built of channels-first parts only (channels_first_parts): their classes
    likely_channels_first: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.store_name:
            suffix = "@input" if self.capture == "input" else ""
            suffix += "".join(f":{e}" for e in (self.element, *self.inner)) if self.element is not None else ""
            self.store_name = self.label + suffix

    @property
    def label(self) -> str:
        """The module's name, or for a method's return value the method's ('random_masking()')."""
        return f"{self.name + '.' if self.name else ''}{self.method}()" if self.method else self.name


def fields_of(value: Any) -> dict[str, Any] | None:
    """A namedtuple's or a dataclass instance's fields by name (not copied, as asdict would);
    None for anything else. Models return both (a block's (hidden, attn) namedtuple, an output
    dataclass), and a field is picked by name as a dict's key would be."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return dict(zip(value._fields, value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return None


def _has_wildcards(text: str) -> bool:
    """Whether a name pattern (or a part of one) holds glob wildcards."""
    return any(c in text for c in "*?[")


def _glob_regex(pattern: str) -> re.Pattern:
    parts = []
    for piece in re.split(r"(\*\*|\*)", pattern):
        if piece == "**":
            parts.append(r".*")
        elif piece == "*":
            parts.append(r"[^.]+")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts) + r"\Z")


_ELEMENT = re.compile(r"-?\d+|[A-Za-z_]\w*")


def _split_pattern(pattern: str) -> tuple[str, str, int | str | None, tuple[int | str, ...]]:
    """'name@input:0' -> ('name', 'input', 0, ()); an element is an index or a key identifier,
    and the ones after the first pick inside it: 'lstm:1:0' -> ('lstm', 'output', 1, (0,)), the
    h_n of an LSTM's (output, (h_n, c_n))."""
    body, elements = pattern, []
    while True:
        head, sep, tail = body.rpartition(":")
        if not (sep and head and head != "re" and _ELEMENT.fullmatch(tail)):
            break
        body = head
        elements.insert(0, int(tail) if tail.lstrip("-").isdigit() else tail)
    element, inner = (elements[0], tuple(elements[1:])) if elements else (None, ())
    capture = "output"
    if body.endswith("@input"):
        body, capture = body[: -len("@input")], "input"
    elif body.endswith("@output"):
        body = body[: -len("@output")]
    return body, capture, element, inner


def module_name(store_name: str) -> str:
    """The module a store name ('blocks.0@input:0') captures from."""
    return _split_pattern(store_name)[0]


def _named_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A module's inputs by the names its forward gives them (keywords it takes as **kwargs too)."""
    try:
        bound = _forward_signature(type(module)).bind(module, *args, **kwargs)
    except TypeError:  # a forward that its own call does not fit: the keywords as given
        return dict(kwargs)
    named: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # after self
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def match_modules(pattern: str, names: Sequence[str]) -> list[str]:
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise HookError(f"layer pattern {pattern!r}: not a regular expression ({exc})") from None
        return [n for n in names if rx.fullmatch(n)]
    if _has_wildcards(pattern):
        rx = _glob_regex(pattern) if "?" not in pattern and "[" not in pattern else re.compile(fnmatch.translate(pattern))
        return [n for n in names if rx.match(n)]
    return [pattern] if pattern in names else []


def _close_matches(word: str, candidates: Sequence[str], n: int, cutoff: float) -> list[str]:
    """difflib.get_close_matches with equally close candidates in their given order (the
    model's: blocks.0 before blocks.1), where difflib reverses them."""
    scored = []
    for x in candidates:
        m = difflib.SequenceMatcher(None, word, x)
        if m.real_quick_ratio() >= cutoff and m.quick_ratio() >= cutoff:
            ratio = m.ratio()  # the costly one, last, as difflib does
            if ratio >= cutoff:
                scored.append((ratio, x))
    return [x for _, x in sorted(scored, key=lambda rx: -rx[0])[:n]]


def nearest_names(pattern: str, names: Sequence[str], n: int = 5) -> list[str]:
    plain = pattern[3:] if pattern.startswith("re:") else pattern
    plain = plain.replace("**", "").replace("*", "")
    last = plain.rpartition(".")[2]
    if "*" in pattern and last and not pattern.startswith("re:"):  # '**.atn': the names ending as the pattern nearly does
        ends = difflib.get_close_matches(last, sorted({x.rpartition(".")[2] for x in names if x}), n=1, cutoff=0.6)
        if ends:
            ending = [x for x in names if x.rpartition(".")[2] == ends[0]]
            return sorted(ending, key=lambda x: -difflib.SequenceMatcher(None, plain, x).ratio())[:n]
    close = _close_matches(plain, names, n=n, cutoff=0.4)
    return close or [x for x in names if x and x.split(".")[0] in plain][:n] or [x for x in names if x][:n]  # "" is the root


def did_you_mean(pattern: str, names: Sequence[str]) -> str:
    """"did you mean X (it matches N)? " for a glob that matches nothing where each of its plain
    components that no name has, replaced by the nearest one that some name has, makes one that
    matches ('encoder_block.*' -> 'encoder_blocks.*'); "" where none does. (A plain name's
    nearest names say the same.)"""
    if pattern.startswith("re:") or not _has_wildcards(pattern):
        return ""
    components = sorted({c for n in names for c in n.split(".") if c})
    fixed = []
    for part in pattern.split("."):
        if _has_wildcards(part) or part in components:
            fixed.append(part)
            continue
        close = difflib.get_close_matches(part, components, n=1, cutoff=0.6)
        if not close:
            return ""
        fixed.append(close[0])
    corrected = ".".join(fixed)
    found = [n for n in match_modules(corrected, names) if n] if corrected != pattern else []
    if not found:
        return ""
    return f"did you mean {corrected!r} (it matches {len(found)})? "


# modules whose outputs are (batch, channels, *positions): a token reduction must be told so
CHANNELS_FIRST_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                          nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                          nn.modules.pooling._AdaptiveMaxPoolNd, nn.GroupNorm)
# and modules whose outputs keep their features last, which channels_first would get wrong
CHANNELS_LAST_MODULES = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.Embedding, nn.RMSNorm)
# modules that act value by value: their output has the layout of their input
ELEMENTWISE_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU,
                       nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                       nn.Hardtanh, nn.Softplus)


def layout_module(module: nn.Module, capture: str = "output") -> nn.Module:
    """The module whose class tells the layout of module's output (or input): an nn.Sequential's
    is its last child's that does more than act value by value (its first's for the input), as a
    CNN block Sequential(Conv2d, BatchNorm2d, ReLU) gives its BatchNorm2d's; any other module's,
    its own (its code may move the axes: a patch embedding's convolution then flatten(2).transpose(1, 2))."""
    while isinstance(module, nn.Sequential):
        children = list(module) if capture == "input" else list(module)[::-1]
        deciding = next((child for child in children if not isinstance(child, ELEMENTWISE_MODULES)), None)
        if deciding is None:
            break
        module = deciding
    return module


def warn_likely_channels_first(selections: Sequence[LayerSelection]) -> None:
    """Says which selected blocks are likely channels-first though not recognised as such (a
    ResNet block), and the flag that makes them so: an extraction's advice, not an error."""
    for sel in selections:
        if sel.likely_channels_first:
            log.warning("%s: its %s is likely (batch, channels, ...), from a block built of %s only; if so, pass "
                        "--channels-first %s, or a token reduction (%s) takes its channels for tokens", sel.name, sel.capture,
                        ", ".join(sel.likely_channels_first), sel.name,
                        "this run's" if sel.reduction != "none" else "a probe's, at read time")


def channels_first_parts(module: nn.Module) -> list[str]:
    """The classes module is built of, where every part that does more than act value by value
    keeps its channels first (convolutions, norms, pooling: a ResNet block); otherwise none. Its
    own output is then likely (batch, channels, ...) too, though its code could move the axes."""
    parts = [m for m in module.modules() if next(m.children(), None) is None and not isinstance(m, ELEMENTWISE_MODULES)]
    if parts and all(isinstance(m, CHANNELS_FIRST_MODULES) for m in parts):
        return sorted({type(m).__name__ for m in parts})
    return []


def parse_layers(patterns: Iterable[str], model: nn.Module, reduction: str | list[int] = "none",
                 channels_first: bool | Sequence[str] = False,
                 layer_reductions: Mapping[str, str | list[int]] | None = None,
                 exclude: Sequence[str] = (), problems: dict[str, str] | None = None,
                 unfold: bool | str | Mapping[str, str] = False) -> list[LayerSelection]:
    """Resolves patterns against model.named_modules(); fails before any data is read.
    reduction is every layer's, unless a pattern of layer_reductions selects the layer;
    channels_first is True for every layer, or the patterns of the layers it applies to;
    unfold (--unfold-batch) is True (every layer's rows sample-major), one layout for every
    layer, or {pattern: layout} for the layers the patterns name;
    exclude names modules to leave out of what the patterns select ('**' but the attention
    modules, whose outputs are tuples). problems: where given, the error of a selected module
    whose options do not fit it is recorded there (a survey), not raised. A wrapped model's
    modules (torch.compile's, DataParallel's) are named as the model's own (loading.named_modules)."""
    modules = named_modules(model)
    names = list(modules)
    # containers without a forward of their own (ModuleList, ModuleDict) are never called, so
    # their hooks would never fire (looked up statically: a scripted module's class raises on `.forward`)
    never_called = {n for n, m in modules.items() if inspect.getattr_static(type(m), "forward", None) is nn.Module.forward}
    scripted = {n for n, m in modules.items() if isinstance(m, torch.jit.ScriptModule)}  # TorchScript takes no hooks
    selected: dict[str, LayerSelection] = {}
    for pattern in patterns:
        body, capture, element, inner = _split_pattern(pattern)
        if "@" in body:
            raise HookError(f"layer pattern {pattern!r}: unknown capture '@{body.rpartition('@')[2]}'; "
                            "use @input or @output")
        if body.endswith("()"):  # a method's return value: 'random_masking()', 'diffloss.sample():0'
            if capture == "input":
                raise HookError(f"layer pattern {pattern!r}: a method's return value is captured, not its arguments; "
                                f"drop '@input' (the module that gives them can be hooked)")
            sel = _method_selection(pattern, body[:-2], element, reduction, modules, inner)
            selected.setdefault(sel.store_name, sel)
            continue
        found = match_modules(body, names)
        found = [n for n in found if n]  # the root module is never a layer
        if not found:
            aliases = module_aliases(model)
            aliased = match_modules(body, list(aliases))
            if aliased:
                raise HookError(f"layer pattern {pattern!r}: {aliased[0]} is {aliases[aliased[0]]} under another name (the "
                                "model holds one module under both, as tied weights do, and torch names it once); hook "
                                f"{aliases[aliased[0]]!r}: it fires at each use, and --multi-fire first, last or stack "
                                "(every use, in order) keeps the one or all")
            raise HookError(f"layer pattern {pattern!r} matches no module; "
                            f"{_prefix_hint(body, names) or did_you_mean(body, names)}nearest names: {nearest_names(body, names)}")
        containers = [n for n in found if n in never_called]
        if containers and len(containers) == len(found):
            raise HookError(f"layer pattern {pattern!r} selects {', '.join(containers)}: a {type(modules[containers[0]]).__name__}, "
                            f"which is never called itself; select its modules, e.g. {containers[0] + '.*'!r}")
        if containers:
            log.info("layer pattern %r: left out %d containers that are never called: %s", pattern, len(containers),
                     ", ".join(containers))
            found = [n for n in found if n not in never_called]
        script = [n for n in found if n in scripted]
        if script and len(script) == len(found):
            raise HookError(f"layer pattern {pattern!r} selects {', '.join(script)}: TorchScript (torch.jit.script or "
                            "torch.jit.load), which takes no hooks; hook the Python module that calls it, or its caller's "
                            "input (MODULE@input)")
        if script:
            log.info("layer pattern %r: left out %d TorchScript modules, which take no hooks: %s", pattern, len(script),
                     ", ".join(script))
            found = [n for n in found if n not in scripted]
        for name in found:
            sel = LayerSelection(name, capture, element, reduction, inner=inner)
            selected.setdefault(sel.store_name, sel)
    layers = list(selected.values())
    for pattern in exclude:
        try:
            excluded = set(match_modules(pattern, [sel.label for sel in layers]))
        except HookError as exc:
            raise HookError(f"--exclude-layers: {exc}") from None
        if not excluded:
            raise HookError(f"--exclude-layers {pattern!r} matches none of the selected modules; nearest: "
                            f"{nearest_names(pattern, list(dict.fromkeys(sel.label for sel in layers)))}")
        layers = [sel for sel in layers if sel.label not in excluded]
        if not layers:
            raise HookError(f"--exclude-layers {' '.join(exclude)} leaves out every module that --layers selects")
    chosen_by: dict[str, tuple[str, str | list[int]]] = {}  # store name -> the --layer-reduction that chose it
    for pattern, layer_reduction in (layer_reductions or {}).items():
        for sel in selected_by(pattern, layers, "--layer-reduction"):
            earlier = chosen_by.setdefault(sel.store_name, (pattern, layer_reduction))
            if earlier[1] != layer_reduction:
                raise HookError(f"{sel.store_name}: --layer-reduction {earlier[0]}={_reduction_text(earlier[1])} and "
                                f"{pattern}={_reduction_text(layer_reduction)} both select it; give it one reduction")
            sel.reduction = layer_reduction
    _assign_unfold(unfold, layers)
    if channels_first is True:
        for sel in layers:
            sel.channels_first = True
    elif channels_first:
        for pattern in channels_first:
            for sel in selected_by(pattern, layers, "--channels-first"):
                sel.channels_first = True
    for sel in layers:
        module = modules[sel.name] if sel.method is None else None  # what a method returns is no module's output
        sel.batch_axis = _batch_axis(module, sel) if module is not None else 0
        if sel.batch_axis:
            log.info("%s: the %s of a %s (batch_first=False) is (sequence or layers, batch, ...): each sample's row is "
                     "taken from its second axis", sel.store_name, sel.capture, type(module).__name__)
        deciding = layout_module(module, sel.capture) if module is not None else None
        whose = f"{sel.name} is a {type(module).__name__}, whose {sel.capture}" + (
            "" if deciding is module else f" (its {type(deciding).__name__}'s)")
        if sel.reduction == "none" and isinstance(deciding, CHANNELS_FIRST_MODULES):
            sel.channels_first = True  # stored whole, nothing to choose: recorded, for reductions at read time
        elif not sel.channels_first and deciding is not None \
                and not isinstance(deciding, CHANNELS_FIRST_MODULES + CHANNELS_LAST_MODULES):
            sel.likely_channels_first = tuple(channels_first_parts(deciding))
        problem = None
        if sel.reduction != "none" and not sel.channels_first and isinstance(deciding, CHANNELS_FIRST_MODULES):
            problem = (f"{whose} is (batch, channels, ...): "
                       f"reduction {_reduction_text(sel.reduction)} would take its channels for tokens; "
                       f"pass --channels-first {sel.name} to reduce its positions")
        if sel.channels_first and isinstance(deciding, CHANNELS_LAST_MODULES):  # stored whole too: its channel axis is recorded
            given = "given alone applies to every layer and" if channels_first is True else f"{' '.join(channels_first)} selects it and"
            problem = (f"{whose} keeps its features last: --channels-first "
                       f"{given} would take them for positions; name only the channels-first layers "
                       "(--channels-first PATTERN...)")
        if problem is not None:
            if problems is None:
                raise HookError(problem)
            problems[sel.store_name] = problem
    return layers


# torch's sequence modules, whose tensors are (sequence, batch, ...) unless batch_first: the
# arguments of theirs that are (an RNN's hidden state is (layers, batch, hidden) either way)
SEQUENCE_FIRST_ARGUMENTS = {nn.MultiheadAttention: ("query", "key", "value"), nn.TransformerEncoderLayer: ("src",),
                            nn.TransformerDecoderLayer: ("tgt", "memory"), nn.Transformer: ("src", "tgt"),
                            nn.TransformerEncoder: ("src",), nn.TransformerDecoder: ("tgt", "memory"),
                            nn.RNNBase: ("input",)}


def _batch_axis(module: nn.Module, sel: LayerSelection) -> int:
    """The axis of the batch in what sel captures of module: 1 for the outputs and sequence
    arguments of torch's sequence modules built without batch_first, and for an RNN's hidden
    state (its output 1, its argument hx) either way; else 0 (MultiheadAttention's output 1,
    its attention weights, and masks are (batch, ...))."""
    kind = next((k for k in SEQUENCE_FIRST_ARGUMENTS if isinstance(module, k)), None)
    if kind is None:
        return 0
    if sel.capture == "output":  # a tensor, an RNN's (output, h_n) or MultiheadAttention's (output, weights)
        if sel.element == 1:
            return int(kind is nn.RNNBase)
        name = "output" if sel.element in (None, 0) else None
    else:
        names = list(_forward_signature(type(module)).parameters)[1:]  # after self
        element = 0 if sel.element is None else sel.element
        name = element if isinstance(element, str) else names[element] if 0 <= element < len(names) else None
        if kind is nn.RNNBase and name == "hx":
            return 1
    layer = module.layers[0] if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) else module
    batch_first = getattr(layer, "batch_first", None)
    if batch_first is None:  # the encoder and decoder layers keep it in their attention
        batch_first = layer.self_attn.batch_first
    return int(not batch_first and (name == "output" or name in SEQUENCE_FIRST_ARGUMENTS[kind]))


def _method_selection(pattern: str, path: str, element: int | str | None, reduction: str | list[int],
                      modules: Mapping[str, nn.Module], inner: tuple[int | str, ...] = ()) -> LayerSelection:
    """The selection of a method's return value: MODULE.METHOD() or, of the model itself, METHOD()."""
    owner, _, method = path.rpartition(".")
    if _has_wildcards(path) or path.startswith("re:") or not method.isidentifier():
        raise HookError(f"layer pattern {pattern!r}: a method is named exactly, as MODULE.METHOD() or METHOD() "
                        "for the model's own")
    if owner not in modules:
        raise HookError(f"layer pattern {pattern!r}: the model has no module {owner!r}; nearest names: "
                        f"{nearest_names(owner, list(modules))}")
    module = modules[owner]
    attr = getattr(module, method, None)
    if isinstance(attr, nn.Module):
        raise HookError(f"layer pattern {pattern!r}: {path} is a module, not a method; hook it as "
                        f"{path!r} (or its input as '{path}@input')")
    if not callable(attr):  # a method, a static one, or a function kept on the instance
        # the methods its own classes define, not nn.Module's (train, zero_grad, ...)
        own = list(dict.fromkeys(m for cls in type(module).__mro__ if not issubclass(nn.Module, cls)
                                  for m, v in vars(cls).items()
                                  if (inspect.isfunction(v) or isinstance(v, (staticmethod, classmethod))) and not m.startswith("__")))
        shown = _close_matches(method, own, n=5, cutoff=0.5) or [m for m in own if not m.startswith("_")][:8]
        raise HookError(f"layer pattern {pattern!r}: {type(module).__name__} ({owner or 'the model'}) has no method "
                        f"{method!r}; its methods: {shown}")
    return LayerSelection(owner, "return", element, reduction, method=method, inner=inner)


def _prefix_hint(pattern: str, names: Sequence[str]) -> str:
    """A name or glob written with the names of wrappers around the model (a policy's 'model.'),
    whose rest matches: say which prefix to drop; or a name that the model holds under such a
    prefix: say which."""
    parts = pattern.split(".")
    for k in (1, 2):
        head, rest = ".".join(parts[:k]), ".".join(parts[k:])
        if not rest or _has_wildcards(head + parts[k]):  # a prefix of plain names only
            break
        matched = match_modules(rest, names)
        if matched:
            return f"the model's names do not start with '{head}.' (drop it: {rest!r} matches {len(matched)}); "
    if pattern.startswith("re:") or _has_wildcards(parts[0]):
        return ""
    # the other way round: a wrapper around the model the names were taken from (probes trained
    # on a store of the MAR, applied to the whole policy)
    for prefix in sorted({n[: -len(pattern)] for n in names if n.endswith("." + pattern)}):  # each a module's name
        if len(prefix.split(".")) <= 3:
            return (f"this model holds it under '{prefix}' ({prefix + pattern!r}; or hand over the module "
                    f"{prefix[:-1]!r} itself); ")
    return ""


def _assign_unfold(unfold: bool | str | Mapping[str, str], layers: Sequence[LayerSelection]) -> None:
    if unfold is False or unfold is None:
        return
    if not isinstance(unfold, Mapping):
        layout = SAMPLE_MAJOR if unfold is True else UnfoldLayout.parse(unfold)
        for sel in layers:
            sel.unfold = layout
        return
    chosen_by: dict[str, tuple[str, UnfoldLayout]] = {}  # store name -> the pattern that gave its layout
    for pattern, text in unfold.items():
        try:
            layout = UnfoldLayout.parse(text)
        except HookError as exc:
            raise HookError(f"--unfold-batch {pattern}={text}: {exc}") from None
        for sel in selected_by(pattern, layers, "--unfold-batch"):
            earlier = chosen_by.setdefault(sel.store_name, (pattern, layout))
            if earlier[1] != layout:
                raise HookError(f"{sel.store_name}: --unfold-batch {earlier[0]}={earlier[1]} and {pattern}={layout} "
                                "both select it; give it one layout")
            sel.unfold = layout


def selected_by(pattern: str, layers: Sequence[LayerSelection], flag: str) -> list[LayerSelection]:
    """The selected layers a pattern names, by module name (all its captures) or by store name
    (one capture: 'decoder_norm@input'); a pattern that names none is a mistake, not a no-op."""
    by_module = set(match_modules(pattern, list(dict.fromkeys(sel.label for sel in layers))))
    by_store = set(match_modules(pattern, [sel.store_name for sel in layers]))
    hits = [sel for sel in layers if sel.label in by_module or sel.store_name in by_store]
    if not hits:
        shown = ", ".join(sel.store_name for sel in layers[:8]) + (", ..." if len(layers) > 8 else "")
        raise HookError(f"{flag} {pattern!r} matches none of the layers --layers selects ({shown})")
    return hits


def _reduction_text(reduction: str | list[int]) -> str:
    """A reduction as --reduction takes it; an index list with its runs as spans (0:256, not 256 numbers)."""
    if isinstance(reduction, str):
        return reduction
    parts, i, n = [], 0, len(reduction)
    while i < n:
        step = reduction[i + 1] - reduction[i] if i + 1 < n else 0
        j = i + 1
        while j < n and reduction[j] - reduction[j - 1] == step:
            j += 1
        if reduction[i] >= 0 and step > 0 and j - i >= 3:  # a run: start:stop[:step]
            parts.append(f"{reduction[i]}:{reduction[j - 1] + step}" + (f":{step}" if step > 1 else ""))
            i = j
        else:
            parts.append(str(reduction[i]))
            i += 1
    return ",".join(parts)


def reduction_text(recorded: str) -> str:
    """A store's recorded reduction (recorded_reduction) as people read and write it: an index
    list as --reduction takes it, runs as spans."""
    body = recorded.removesuffix(CHANNELS_FIRST_NOTE)
    return recorded if not body.startswith("[") else _reduction_text(json.loads(body)) + recorded[len(body):]


def reduce_tokens(x: torch.Tensor, reduction: str | list[int], channels_first: bool = False,
                  channel_axis: int = 1) -> torch.Tensor:
    """Token reductions on the device, before the transfer. Tokens are every axis between the
    batch and the features (the last axis): (B, T, D), or (B, frames, T, D) as UVA's z_proj,
    taken as the frames * T tokens, in the order the encoder blocks see them. channels_first:
    (B, C, *positions), as convolutions give; the positions are the tokens, in row-major order.
    An unfolded capture, (B, k, C, *positions), has its channels at channel_axis 2: its tokens
    are the k rows' positions."""
    if reduction == "none":
        return x
    if channels_first:
        x = x.movedim(channel_axis, -1)
    if x.dim() < 3:
        raise HookError(f"reduction {reduction!r} needs (batch, tokens, features) activations, got shape {tuple(x.shape)}")
    x = x.flatten(1, -2)
    if reduction == "mean":
        return _token_mean(x, 1)
    if isinstance(reduction, str) and reduction.startswith("mean:"):  # the means of equal groups: UVA's 4 frames
        groups, tokens = int(reduction[5:]), x.shape[1]
        if tokens % groups:
            raise HookError(f"reduction {reduction}: its {tokens} tokens do not split into {groups} equal groups")
        return _token_mean(x.unflatten(1, (groups, tokens // groups)), 2)
    if reduction in ("first", "last"):
        if not x.shape[1]:  # (an uneven capture's sample whose tokens are all padding)
            raise HookError(f"reduction {reduction!r} takes a token, and a sample has none")
        return x[:, 0] if reduction == "first" else x[:, -1]
    tokens = x.shape[1]
    if any(not -tokens <= i < tokens for i in reduction):  # checked on the host: no wait for the device
        raise HookError(f"token index {reduction} is out of range for {tokens} tokens")
    return x.index_select(1, _token_index(tuple(i % tokens for i in reduction), x.device))


def _token_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Of 16-bit tokens: summed and kept in float32, rounded once, to the stored dtype."""
    return x.mean(dim=dim, dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.mean(dim=dim)


@functools.lru_cache(maxsize=256)
def _token_index(indices: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The index tensor of a token list, made once per device (a host-to-device copy each
    batch could make the host wait for the stream). A normal tensor, not an inference one, so
    that a forward with autograd (--train-mode) can use it too."""
    with torch.inference_mode(False):
        return torch.tensor(indices, dtype=torch.long, device=device)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a is b, or a view of it (reductions such as a first token are views)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.numel() > 0


CHANNELS_FIRST_NOTE = " (channels first)"


def recorded_reduction(reduction: str | list[int], channels_first: bool) -> str:
    """A layer's reduction as its store records it (the layer's `reduction` attribute): an
    index list as JSON, and a note where the tokens were a channels-first capture's positions."""
    text = json.dumps(reduction) if isinstance(reduction, list) else str(reduction)
    return text + CHANNELS_FIRST_NOTE if channels_first and reduction != "none" else text


def parse_recorded_reduction(text: str) -> tuple[str | list[int], bool]:
    """recorded_reduction's inverse: (the reduction, whether its tokens were channels-first positions)."""
    body = text.removesuffix(CHANNELS_FIRST_NOTE)
    return (json.loads(body) if body.startswith("[") else parse_reduction(body)), body != text


def parse_reduction(text: str) -> str | list[int]:
    if text in REDUCTIONS or re.fullmatch(r"mean:[1-9][0-9]*", text):
        return text
    indices: list[int] = []
    for part in text.split(","):
        span = re.fullmatch(r"\s*(\d+):(\d+)(?::([1-9]\d*))?\s*", part)  # start:stop[:step], as Python slices
        if span is not None and int(span[1]) < int(span[2]):
            indices += range(int(span[1]), int(span[2]), int(span[3] or 1))
            continue
        try:
            indices.append(int(part))
        except ValueError:
            raise HookError(f"reduction {text!r}: use one of {REDUCTIONS}, mean:G (the means of G equal groups of the "
                            "tokens, in order: frames) or a comma-separated list of token indices and start:stop[:step] "
                            "spans (0:256: UVA's first frame)") from None
    return indices


@dataclass
class _State:
    fired: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    rows: int | None = None  # samples in the batch, when the caller says
    lengths: dict[str, list[int]] = field(default_factory=dict)  # padded uneven captures: each sample's token count
    error: HookError | None = None  # the first a hook raised, kept in case the model swallowed it


@dataclass
class LayerSurvey:
    """What one selected module did in a surveyed forward, and what extraction would store."""
    name: str  # the store name
    module: str  # its class
    calls: int  # firings in the forward
    gave: str  # what its hook saw at the first firing, described
    row: tuple[int, ...] | None  # the stored row's shape, where extraction would store it
    source_dtype: str | None
    problem: str | None  # else the error extraction would stop with, which says what fixes it
    # over several forwards, a layer stored ragged: the fewest and most tokens a sample, and the mean
    tokens: tuple[int, int] | None = None
    mean_tokens: float | None = None
    ragged_from: int | None = None  # the batch whose token count makes the run rewrite it ragged, after two alike
    lengths: list[int] | None = None  # an uneven capture's token count for each sample (row: padded to the most)


def describe_value(value: Any, depth: int = 0) -> str:
    """A module's output (or input) in a few words: 'Tensor(16, 64, 32) float32', 'tuple(Tensor(16,
    64, 32) float32, None)', 'Hidden(hidden: Tensor(...) float32, attn: None)'; nested containers
    by their size."""
    if isinstance(value, PackedSequence):  # (batch, tokens, ...) as pad_packed_sequence gives it
        sizes = value.batch_sizes.tolist()  # sequences still running at each step, the longest first
        shortest = sum(n == sizes[0] for n in sizes)
        axes = ", ".join(map(str, [sizes[0], f"{shortest}-{len(sizes)}" if shortest < len(sizes) else shortest,
                                   *value.data.shape[1:]]))
        return f"PackedSequence({axes}) {str(value.data.dtype).removeprefix('torch.')}"
    if isinstance(value, torch.Tensor) and value.is_nested:  # its shape is not a tuple of ints
        shapes = [tuple(t.shape) for t in value.unbind()]
        sizes = [sorted({shape[k] for shape in shapes}) for k in range(len(shapes[0]))] if shapes else []
        axes = ", ".join(str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}" for v in sizes)
        return f"NestedTensor({len(shapes)}{', ' if axes else ''}{axes}) {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if value is None:
        return "None"
    fields = fields_of(value)
    items = list(fields.items()) if fields is not None else list(value.items()) if isinstance(value, Mapping) else None
    if items is None and not isinstance(value, (tuple, list)):
        return type(value).__name__
    size = len(items if items is not None else value)
    if depth:
        return f"{type(value).__name__} of {size}"
    parts = [f"{k}: {describe_value(v, 1)}" for k, v in items[:4]] if items is not None else \
        [describe_value(v, 1) for v in value[:4]]
    return f"{type(value).__name__}({', '.join(parts + (['...'] if size > 4 else []))})"


class Capture:
    """Hooks the selected modules of a model for the duration of a with block (see module doc).
    survey: a hook's error is recorded for its module and the forward goes on, for
    survey_batch() to say what each module gave and would store (a dry run)."""

    def __init__(self, model: nn.Module, layers: Sequence[LayerSelection], *, multi_fire: str = "error",
                 allow_missing: bool = False, stop_early: bool = False, survey: bool = False):
        if multi_fire not in MULTI_FIRE:
            raise HookError(f"multi-fire policy {multi_fire!r}: use one of {MULTI_FIRE}")
        self.layers = list(layers)
        self.multi_fire = multi_fire
        self.allow_missing = allow_missing
        self.stop_early = stop_early
        self.modules = named_modules(model)
        self.model = model  # (aliases: looked up only where a module fires twice)
        self._handles: list[torch.utils.hooks.RemovableHandle | _MethodHook] = []
        self._state = _State()
        self.missing_counts = {sel.store_name: 0 for sel in self.layers}
        self.source_dtypes: dict[str, torch.dtype] = {}  # what each module gave, before any reduction
        # the row axis that holds the channels of a channels-first capture stored with its positions
        self.channel_axes: dict[str, int] = {}
        # each unfolded capture's layout, every size given: (m=4 b t=64) stored as (B, 4, 64, ...)
        self.unfolded: dict[str, UnfoldLayout] = {}
        self.survey = survey
        self.calls: dict[str, int] = {sel.store_name: 0 for sel in self.layers}
        self._first_fired: dict[str, None] = {}  # store names in the order they first fired (an ordered set)
        self.seen: dict[str, str] = {}  # survey: what each hook saw first, described
        self.problems: dict[str, str] = {}  # survey: each module's first error in this forward
        # the last finished batch's uneven captures (nested tensors, packed sequences): each sample's token count
        self.lengths: dict[str, list[int]] = {}

    def __enter__(self) -> "Capture":
        try:
            for sel in self.layers:
                module = self.modules[sel.name]
                if sel.capture == "return":
                    handle = _MethodHook(module, sel.method, self._make_hook(sel))
                elif sel.capture == "input":
                    handle = module.register_forward_pre_hook(self._make_hook(sel), with_kwargs=True)
                else:
                    handle = module.register_forward_hook(self._make_hook(sel), with_kwargs=True)
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in reversed(self._handles):  # last first: a method wrapped twice is unwrapped in turn
            handle.remove()
        self._handles.clear()
        self._state = _State()

    def _make_hook(self, sel: LayerSelection):
        def pick(value: Any) -> torch.Tensor:
            if self.survey and sel.store_name not in self.seen:
                self.seen[sel.store_name] = describe_value(value)
            path = () if sel.element is None else (sel.element, *sel.inner)

            def picked(depth: int) -> str:  # the elements picked before path[depth], for messages
                return "".join(f":{e}" for e in path[:depth])

            fields = None if isinstance(value, torch.Tensor) else fields_of(value)  # the common case, kept cheap
            for depth, element in enumerate(path):
                if isinstance(value, torch.Tensor):
                    # indexing would silently take the first sample (':0') or fail inside torch (':key')
                    raise HookError(f"{sel.store_name}: the {sel.capture} of {sel.label}{picked(depth)} is a tensor, and "
                                    f"':{element}' picks an element of a tuple, list or dict; hook {sel.label}"
                                    f"{'@input' if sel.capture == 'input' else ''}{picked(depth)} without it (--reduction "
                                    "picks tokens)")
                try:
                    value = fields[element] if fields is not None and isinstance(element, str) else value[element]
                except (KeyError, IndexError, TypeError):
                    if depth == 0 and sel.capture == "input" and isinstance(element, str):
                        raise HookError(f"{sel.store_name}: {sel.name} was called without an argument {element!r}; "
                                        f"its arguments: {list(value)}") from None
                    has = f"fields {', '.join(fields)}" if fields is not None else (
                        f"keys {sorted(map(str, value))}" if isinstance(value, Mapping) else (
                            f"elements 0 to {len(value) - 1}" if isinstance(value, (tuple, list)) else "no elements"))
                    raise HookError(f"{sel.store_name}: the {sel.capture} of {sel.label}{picked(depth)} is a "
                                    f"{type(value).__name__} with no element {element!r}; it has {has}") from None
                fields = None if isinstance(value, torch.Tensor) else fields_of(value)
            if isinstance(value, PackedSequence):  # an RNN's sequences of different lengths: taken whole
                return value
            if not path and sel.capture != "input" and fields:
                raise HookError(f"{sel.label} returns a {type(value).__name__} with fields {', '.join(fields)}; "
                                f"pick one with '{sel.label}:{next(iter(fields))}'")
            if not path and isinstance(value, (tuple, list)) and len(value) and isinstance(value[0], torch.Tensor) \
                    and sel.capture != "input":
                raise HookError(f"{sel.label} returns a {type(value).__name__} of {len(value)}; pick one with "
                                f"'{sel.label}:0' (or another index)")
            if not isinstance(value, torch.Tensor):
                inside = " (one more ':index' picks inside it)" if isinstance(value, (tuple, list, Mapping)) else ""
                raise HookError(f"{sel.store_name}: the {sel.capture} of {sel.label}{picked(len(path))} is a "
                                f"{type(value).__name__}, not a tensor; pick a tensor element with ':index' or ':key'{inside}")
            return value

        def hook(module, args, kwargs, output=None):
            if sel.capture == "input":
                if isinstance(sel.element, str):  # @input:x names the forward's argument
                    value = pick(_named_inputs(module, args, kwargs))
                else:
                    value = args + tuple(kwargs.values())
                    value = pick(value if sel.element is not None else value[0])
            else:
                value = pick(output)
            fired = self._state.fired.setdefault(sel.store_name, [])
            if fired and self.multi_fire == "error":
                raise HookError(f"{sel.label} fired more than once in one forward{self._why_again(sel)}; choose "
                                "--multi-fire first, last or stack")
            if fired and self.multi_fire == "first":
                return None
            if isinstance(value, PackedSequence) or value.is_nested:  # samples of different lengths
                value, lengths = self._padded(sel, value)
                folded_dims = value.dim()
            else:
                if sel.batch_axis and value.dim() > 1:  # (sequence, batch, ...): a row per sample
                    value = value.transpose(0, 1)
                folded_dims = value.dim()
                value, lengths = self._per_sample(sel, value), None
            self.source_dtypes.setdefault(sel.store_name, value.dtype)
            if value.dtype in (torch.float64, torch.bool):
                # the kernels take float32, bfloat16 and float16: these become float32 on the device (a
                # mask exactly; a float64 value past float32's range counts as non-finite, not as an overflow)
                value = value.to(torch.float32)
            elif not value.is_floating_point():
                raise HookError(f"{sel.store_name}: the {sel.capture} of {sel.label} holds {str(value.dtype).removeprefix('torch.')} "
                                "values; marstore stores floating-point values (float32, bfloat16, float16, float64) and bool "
                                "masks, not integers or complex numbers: hook a module that gives floats")
            channel_axis = 1 + value.dim() - folded_dims  # unfolded, (B, k, ...): the module's channels moved one axis on
            if sel.channels_first and sel.reduction == "none":  # stored whole: the row's axis, one on for stacked firings
                self.channel_axes.setdefault(sel.store_name, channel_axis - 1 + (self.multi_fire == "stack"))
            try:
                if lengths is None:
                    x = reduce_tokens(value.detach(), sel.reduction, sel.channels_first, channel_axis)
                elif sel.reduction != "none":  # each sample over its own tokens, not the padding
                    x = torch.cat([reduce_tokens(value[i:i + 1, :n].detach(), sel.reduction) for i, n in enumerate(lengths)])
                    lengths = None
                else:
                    x = value.detach()
            except HookError as exc:
                raise HookError(f"{sel.store_name}: {exc}; leave it out of --layers, or store it whole: "
                                f"--layer-reduction {sel.store_name}=none") from None
            if lengths is None and _same_memory(x, value):  # (an uneven capture's padded copy is the hook's own)
                # The copy to the host comes after the forward, and the model may still change this
                # tensor in place (ReLU(inplace=True) after a BatchNorm, `out += identity`): keep
                # what the hook saw. A device copy; the model's own tensor is freed as before.
                x = x.clone(memory_format=torch.contiguous_format)
            if lengths is not None and self.multi_fire == "stack":
                raise HookError(f"{sel.label} gives samples of different lengths, whose firings cannot be stacked "
                                "(--multi-fire stack): choose first or last, or reduce its tokens (--reduction)")
            if self.multi_fire == "last":
                fired[:] = [x]
            else:
                fired.append(x)
            if lengths is not None:
                self._state.lengths[sel.store_name] = lengths
            else:  # (a dense last firing after an uneven one)
                self._state.lengths.pop(sel.store_name, None)
            self._state.done.add(sel.store_name)
            if self.stop_early and len(self._state.done) == len(self.layers):
                raise StopForward
            return None

        def checked(module, args, kwargs, output=None):
            self.calls[sel.store_name] += 1
            if sel.store_name not in self._first_fired:
                self._first_fired[sel.store_name] = None
            try:
                return hook(module, args, kwargs, output)
            except HookError as exc:
                if self.survey:  # said for this module; the forward goes on to the others
                    self.problems.setdefault(sel.store_name, str(exc))
                    return None
                self._state.error = self._state.error or exc
                raise

        hook_fn = (lambda module, args, kwargs: checked(module, args, kwargs)) if sel.capture == "input" else checked
        if "torch._dynamo" in sys.modules:  # imported once anything was compiled (torch.compile)
            # Dynamo would trace this Python, specialise it on each layer and recompile past its limit: it runs
            # outside the graph instead, which breaks at each hooked module, and sees real tensors.
            hook_fn = torch.compiler.disable(hook_fn)
        return hook_fn

    def _padded(self, sel: LayerSelection, value: torch.Tensor | PackedSequence) -> tuple[torch.Tensor, list[int]]:
        """Samples of different lengths, each (tokens, ...): a nested tensor (torch.nested:
        nn.TransformerEncoder's layers give one where a padding mask lets them skip the padding)
        or a PackedSequence (an RNN's, run on pack_padded_sequence's sequences), padded with zeros
        to (B, most tokens, ...) in the batch's order, and each sample's token count."""
        if isinstance(value, PackedSequence):
            kind = "packed sequence"
            padded, counts = pad_packed_sequence(value, batch_first=True)
            counts = counts.tolist()
        else:
            kind, samples = "nested tensor", value.unbind()
            if not samples or samples[0].dim() == 0 or any(t.shape[1:] != samples[0].shape[1:] for t in samples):
                shapes = sorted({tuple(t.shape) for t in samples})
                raise HookError(f"{sel.store_name}: the {sel.capture} of {sel.label} is a nested tensor whose samples have "
                                f"shapes {shapes[:4]}; marstore takes nested samples of (tokens, ...) that differ only in "
                                "their token count: hook another module")
            padded, counts = torch.nested.to_padded_tensor(value, 0.0), [int(t.shape[0]) for t in samples]
        rows = self._state.rows
        if rows is not None and len(counts) != rows:
            raise HookError(f"{sel.store_name}: a {kind} of {len(counts)} sequences for a batch of {rows} samples; "
                            "marstore stores one sequence a sample: hook a module that keeps the batch")
        if sel.channels_first or sel.unfold is not None:
            raise HookError(f"{sel.store_name}: the {sel.capture} of {sel.label} is a {kind}, taken as (samples, "
                            "tokens, ...): leave out --channels-first and --unfold-batch for it")
        return padded, counts

    def _per_sample(self, sel: LayerSelection, value: torch.Tensor) -> torch.Tensor:
        """One leading row per sample. A module that folds another axis into the batch (UVA's
        action head runs on B*4 rows) is an error, or, with an unfold layout, unfolded by it:
        (b k) takes the rows as sample-major, (B, k, ...)."""
        rows = self._state.rows
        if rows is None or value.dim() == 0 or value.shape[0] == rows:
            return value
        n = value.shape[0]
        if n % rows:
            raise HookError(f"{sel.store_name}: {n} leading rows for a batch of {rows} samples; marstore stores one "
                            "row per sample: hook a module that keeps the batch axis")
        if sel.unfold is None:
            raise HookError(f"{sel.store_name}: {n} leading rows for a batch of {rows} samples ({n // rows} a sample: "
                            "the module folds another axis into the batch); pass --unfold-batch to store them as "
                            f"({rows}, {n // rows}, ...) taking the rows as sample-major, --unfold-batch LAYOUT where "
                            "they are ordered otherwise ('(k b)' for x.repeat(k, 1)), or hook another module")
        try:
            if sel.store_name not in self.unfolded:
                self.unfolded[sel.store_name] = sel.unfold.resolved(n, rows)
            return sel.unfold.unfold(value, rows)
        except HookError as exc:
            raise HookError(f"{sel.store_name}: {exc}") from None

    @property
    def forward_order(self) -> list[str]:
        """The store names in the order the forward made them (their first firing in any batch so
        far: a module's output after its sub-modules', its @input before them), then those that never
        fired, as selected: the depth axis of probes' and similarities' plots, whatever order
        --layers gave."""
        return [*self._first_fired, *(sel.store_name for sel in self.layers if sel.store_name not in self._first_fired)]

    def start_batch(self, rows: int | None = None) -> None:
        """Forgets what earlier batches captured; rows (the batch's samples) lets every capture
        be checked for one leading row per sample."""
        self._state = _State(rows=rows)

    def finish_batch(self) -> dict[str, torch.Tensor]:
        """{store name: tensor} for this batch; a module that did not fire is an error unless
        allowed. An uneven capture's tensor (a nested tensor's, a packed sequence's) is padded, (B,
        most tokens, ...): self.lengths then holds each of its samples' token count, for this batch."""
        if self._state.error is not None:  # a hook's error that the model's own `except` swallowed
            raise self._state.error
        captured, out = self.captured(), {}
        for sel in self.layers:
            if sel.store_name not in captured:
                self.missing_counts[sel.store_name] += 1
                if not self.allow_missing:
                    raise HookError(self._never_called(sel) or f"{sel.label} did not fire in this batch (some modules run "
                                    "only in some task modes); check the forward, or pass --allow-missing to skip it")
                continue
            out[sel.store_name] = captured[sel.store_name]
        self.lengths = {name: counts for name, counts in self._state.lengths.items() if name in out}
        self._state = _State()
        return out


    def captured(self) -> dict[str, torch.Tensor]:
        """What this forward's hooks captured so far, as finish_batch gives it but unchecked."""
        return {name: torch.stack(fired, dim=1) if self.multi_fire == "stack" else fired[0]
                for name, fired in self._state.fired.items() if fired}

    def forget(self) -> None:
        """Drops what this forward's hooks found (a forward run once more, to compare)."""
        self._state = _State()
        self.calls = dict.fromkeys(self.calls, 0)
        self.problems = {}

    @functools.cached_property
    def aliases(self) -> dict[str, str]:
        """The model's other names of modules it holds under several (module_aliases)."""
        return module_aliases(self.model)

    def _why_again(self, sel: LayerSelection) -> str:
        """Why a module fires more than once in a forward: it is held under other names too, or
        called again (in a loop, or once per denoising step as diffusion heads are)."""
        also = [alias for alias, name in self.aliases.items() if name == sel.name]
        if also:
            return (f": the model holds it also as {', '.join(also)} (one module under {len(also) + 1} names, as tied "
                    "weights are), and it fires at each use")
        return " (diffusion heads fire once per step)"

    def _never_called(self, sel: LayerSelection) -> str | None:
        """Why a module can never fire, where its parent uses its weights without calling it."""
        parent = sel.name.rpartition(".")[0]
        if sel.method is None and isinstance(self.modules.get(parent), nn.MultiheadAttention):
            return (f"{sel.name} never fires: its nn.MultiheadAttention ({parent}) uses its weights without calling it; "
                    f"hook '{parent}:0' for the attention's output")
        return None

    def survey_batch(self, problems: Mapping[str, str] | None = None) -> list[LayerSurvey]:
        """What each module did in this batch's forward (survey=True): its firings, what it
        gave (at its first firing of all), and the row extraction would store, or the error
        extraction would stop with (problems: those found before the forward, by parse_layers,
        come first). The next forward is surveyed afresh."""
        found = []
        for sel in self.layers:
            name, fired = sel.store_name, self._state.fired.get(sel.store_name)
            problem = (problems or {}).get(name) or self.problems.get(name)
            row = dtype = None
            if problem is None and not fired:
                problem = self._never_called(sel) or (
                    f"{sel.label} did not fire (some modules run only in some task modes, or in sampling): run it with "
                    "another --forward, or leave it out (--allow-missing covers batches after the first)")
            elif problem is None:
                try:
                    x = torch.stack(fired, dim=1) if self.multi_fire == "stack" else fired[0]
                    row, dtype = tuple(x.shape[1:]), str(self.source_dtypes[name]).removeprefix("torch.")
                except RuntimeError as exc:
                    problem = f"{sel.label}: its firings cannot be stacked (--multi-fire stack): {' '.join(str(exc).split())}"
            kind = type(self.modules[sel.name]).__name__ + (f".{sel.method}()" if sel.method else "")
            found.append(LayerSurvey(name, kind, self.calls[name], self.seen.get(name, "-"), row, dtype, problem,
                                     lengths=self._state.lengths.get(name) if problem is None else None))
        self._state = _State()
        self.calls = dict.fromkeys(self.calls, 0)
        self.problems = {}
        return found


class _MethodHook:
    """A module's method wrapped on the instance while a Capture lasts: the wrapper calls it and
    hands its return value to the hook, as a forward hook is handed a module's output (MAR's
    random_masking() gives the mask that no module's output holds). remove() puts back what
    the instance had."""

    def __init__(self, module: nn.Module, method: str, hook: Callable) -> None:
        self.module, self.method = module, method
        self.had, self.saved = method in module.__dict__, module.__dict__.get(method)
        original = getattr(module, method)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            hook(module, args, kwargs, out)
            return out

        wrapper.marstore_capture = True  # type: ignore[attr-defined]  # hook_count() finds it
        self.wrapper = wrapper
        module.__dict__[method] = wrapper

    def remove(self) -> None:
        if self.module.__dict__.get(self.method) is self.wrapper:
            if self.had:
                self.module.__dict__[self.method] = self.saved
            else:
                del self.module.__dict__[self.method]


def hook_count(model: nn.Module) -> int:
    """Hooks still installed on any module of the model, methods wrapped by a Capture included
    (for the tests and for safety checks)."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks)
        total += sum(1 for v in m.__dict__.values() if getattr(v, "marstore_capture", None) is True)
    return total
