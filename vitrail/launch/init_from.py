"""`model.init_from`: a fresh run's backbones (and, asked, its heads) start from existing weights.

What it reads:
  - a vitrail run dir or checkpoint: the backbone vitrail evaluates (DINO / iBOT's teacher, BYOL's
    online network); with `model.init_heads`, the rest of the method's state too (heads, centres),
    which needs a run of the same method;
  - a folder written by `vitrail export` (its model.safetensors);
  - released backbones: DINO's and iBOT's .pth layouts (as `vitrail eval --checkpoint` reads them),
    timm's .safetensors and .pth state dicts.
Student and teacher backbones both get the weights, so the EMA teacher starts where the student
does. A resumed run never comes here: its checkpoint holds everything.
"""

from __future__ import annotations

import logging

from torch import nn

from vitrail.backbones.exported import WEIGHTS_FILE, read_safetensors
from vitrail.backbones.weights import fit
from vitrail.errors import VitrailError
from vitrail.eval.checkpoint import backbone_weights, is_vitrail_checkpoint, load_state, vitrail_checkpoint
from vitrail import checkpoints, storage
from vitrail.config import Config

log = logging.getLogger("vitrail.init")
_LENIENT = "; set model.init_strict=false to load the keys that fit and log the others"


def initialise(method: nn.Module, config: Config) -> None:
    """Load `config.model.init_from` into the method's student and teacher backbones (and heads)."""
    model = config.model
    try:
        weights, run_state = _read(str(model.init_from))
    except VitrailError as error:
        raise VitrailError(f"model.init_from: {error}") from None
    student, teacher = method.backbone_pair()
    source = f"model.init_from {model.init_from}"
    skipped = fit(student, weights, source, model.init_strict, _LENIENT)
    if teacher is not student:
        fit(teacher, weights, source, model.init_strict, _LENIENT)
    for line in skipped:
        log.warning("init_from skipped %s", line)
    if model.init_heads:
        _load_heads(method, run_state, config, source)
    log.info("student and teacher backbones start from %s (%d keys skipped)", model.init_from, len(skipped))


def _read(path: str) -> tuple[dict, dict | None]:
    """(backbone weights under the backbone's key names, the vitrail checkpoint they came from or None);
    `path` is local or a URL."""
    if not storage.exists(path):
        raise VitrailError(f"{path} does not exist")
    weights_file = storage.join(path, WEIGHTS_FILE)
    if storage.is_dir(path) and storage.exists(weights_file) and not checkpoints.list_checkpoints(path):
        path = weights_file  # an export folder
    if path.endswith(".safetensors"):
        return backbone_weights(read_safetensors(path), path), None
    file, state = load_state(path)
    if is_vitrail_checkpoint(state):
        return vitrail_checkpoint(file, state).backbone.state_dict(), state
    return backbone_weights(state, file), None


def _load_heads(method: nn.Module, run_state: dict | None, config: Config, source: str) -> None:
    """Every tensor of the method outside its backbones (heads, DINO's centre) from the run's checkpoint."""
    if run_state is None:
        raise VitrailError(f"model.init_heads: {source} is not a vitrail run, so it holds no heads; "
                           "set model.init_heads=false to start them fresh")
    ran = run_state["config"]["method"]["name"]
    if ran != config.method.name:
        raise VitrailError(f"model.init_heads: {source} ran method {ran!r}, this run {config.method.name!r}: "
                           "heads only carry over within one method; set model.init_heads=false")
    student, teacher = method.backbone_pair()
    inside = tuple(f"{name}." for name, module in method.named_modules() if module is student or module is teacher)
    own = {key: value for key, value in method.state_dict().items() if not key.startswith(inside)}
    stored = {key: value for key, value in run_state["method"].items() if not key.startswith(inside)}
    fitting = {key: value for key, value in stored.items() if key in own and value.shape == own[key].shape}
    skipped = sorted(set(own) - set(fitting)) + sorted(set(stored) - set(own))
    if skipped and config.model.init_strict:
        raise VitrailError(f"model.init_heads: the heads in {source} do not fit this run's (method.* settings "
                           f"differ?): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}{_LENIENT}")
    method.load_state_dict(fitting, strict=False)
    for key in skipped:
        log.warning("init_heads skipped %s", key)
