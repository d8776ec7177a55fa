"""The model folder: a trained model in timm's Hub layout, loadable by name with ``local-dir:<folder>``.

    <folder>/config.json         architecture, num_classes, label_names, model_args and the pretrained_cfg
                                 (mean, std, input size, crop, interpolation) the model was trained with,
                                 written by timm's own `save_config_for_hf`
    <folder>/model.safetensors   the weights, keys as ``timm.create_model`` expects
    <folder>/README.md           the model card: the Hub's YAML header, how the model was made, its accuracy

``timm.create_model('local-dir:<folder>', pretrained=True)``, timm's ``validate.py --model local-dir:<folder>
--pretrained`` and ``create_distill_task(..., teacher='local-dir:<folder>')`` read it. The folder is written as a
unit (built beside it, then swapped in), so after a crash at any point its weights, config and card agree.
"""
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch.nn as nn
import yaml
from timm.models._hub import _PREFERRED_FILES, save_config_for_hf
from timm.utils.model import get_state_dict, unwrap_model

from ._atomic import atomic_write, new_folder_for, replace_folder, save_safetensors_atomic
from ._checkpoint_checks import check_checkpoint_readable
from .errors import UsageError

__all__ = [
    'MODEL_FOLDER_SUPPORTED', 'LOCAL_DIR_PREFIX', 'CONFIG_FILE', 'WEIGHTS_FILE', 'CARD_FILE', 'ModelCard', 'save_model_folder',
    'render_model_card', 'model_folder_of', 'check_model_folder', 'model_folder_weights',
    'ModelName', 'resolve_model_name', 'hub_offline', 'check_pretrained_available',
]

# timm writes the preprocessing a model was trained with into config.json only since its save_config_for_hf takes
# data_config (timm 1.0.29); older timm can load such a folder but not write one
MODEL_FOLDER_SUPPORTED = 'data_config' in inspect.signature(save_config_for_hf).parameters
LOCAL_DIR_PREFIX = 'local-dir:'
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
CARD_FILE = 'README.md'


@dataclass
class ModelCard:
    """What the model card (README.md) says about a model.

    Args:
        name: the model's name (e.g. the experiment), the card's title.
        description: one paragraph on what the model is.
        details: "How it was made" entries; a dict or list value becomes a nested list.
        metrics: accuracy in percent by metric name, e.g. ``{'top-1': 93.3, 'top-5': 100.0}``.
        dataset: the evaluation data, as the card names it (e.g. the data folder).
        split: the evaluated split.
        hub_datasets: Hugging Face Hub dataset ids of the data, for the YAML header, when known.
        tags: extra Hub tags (``timm`` and ``image-classification`` are always there).
        command: the command that reproduces the model.
    """
    name: str
    description: str
    details: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, float] = field(default_factory=dict)
    dataset: Optional[str] = None
    split: Optional[str] = None
    hub_datasets: Sequence[str] = ()
    tags: Sequence[str] = ()
    command: Optional[str] = None


def _markdown_list(details: Dict[str, Any]) -> str:
    """``- **key:** value`` lines, with dict and list values as indented sub-lists (as timm's model cards)."""
    lines = []
    for key, value in details.items():
        if isinstance(value, dict):
            lines.append(f'- **{key}:**')
            lines.extend(f'  - {k}: `{v}`' for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            lines.append(f'- **{key}:**')
            lines.extend(f'  - {v}' for v in value)
        else:
            lines.append(f'- **{key}:** {value}')
    return '\n'.join(lines)


def render_model_card(card: ModelCard, folder: str) -> str:
    """The README.md text: the Hub's YAML header (library, tags, datasets, metrics), usage, recipe and results."""
    header: Dict[str, Any] = {
        'library_name': 'timm',
        'pipeline_tag': 'image-classification',
        'tags': ['image-classification', 'timm', *card.tags],
    }
    if card.hub_datasets:
        header['datasets'] = list(card.hub_datasets)
    if card.metrics:
        header['metrics'] = ['accuracy']
        header['model-index'] = [{
            'name': card.name,
            'results': [{
                'task': {'type': 'image-classification', 'name': 'Image Classification'},
                'dataset': {'name': card.dataset or 'unknown', 'type': (list(card.hub_datasets) or ['imagefolder'])[0],
                            **({'split': card.split} if card.split else {})},
                'metrics': [{'type': 'accuracy', 'name': f'{name} accuracy', 'value': round(value, 3)}
                            for name, value in card.metrics.items()],
            }],
        }]
    model_name = LOCAL_DIR_PREFIX + folder
    sections = [
        '---\n' + yaml.safe_dump(header, sort_keys=False) + '---',
        f'# {card.name}',
        card.description,
        '## Usage',
        "```python\nimport timm\n\n"
        f"model = timm.create_model('{model_name}', pretrained=True).eval()\n"
        "data_config = timm.data.resolve_data_config({}, model=model)  # the trained input size and normalisation\n"
        "transform = timm.data.create_transform(**data_config)\n```",
        f"timm's validate.py: `python validate.py --model {model_name} --pretrained --data-dir DATA`. "
        f"As a teacher: `timm-sadistill train ... --distill sa --teacher {model_name}`.",
    ]
    if card.details:
        sections += ['## How it was made', _markdown_list(card.details)]
    if card.metrics:
        where = ' '.join(filter(None, [f'`{card.dataset}`' if card.dataset else '', card.split and f'split `{card.split}`']))
        sections += [f'## Results{" on " + where if where else ""}',
                     '| ' + ' | '.join(card.metrics) + ' |\n' + '|---' * len(card.metrics) + '|\n'
                     + '| ' + ' | '.join(f'{v:.2f}' for v in card.metrics.values()) + ' |']
    if card.command:
        sections += ['## Reproduce', f'```bash\n{card.command}\n```']
    return '\n\n'.join(sections) + '\n'


def save_model_folder(
        model: nn.Module,
        folder: str,
        data_config: Optional[Dict[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        card: Optional[ModelCard] = None,
        metadata: Optional[Dict[str, str]] = None,
) -> str:
    """Write ``model`` as a timm model folder (config.json, model.safetensors and, with ``card``, README.md).

    Args:
        model: a timm model (DDP, compile and EMA wrappers are looked through).
        folder: the folder to write; created if missing, replaced as a whole if it holds a model folder or is a
            symlink (the link goes, the folder it points to stays as it is).
        data_config: the preprocessing the model was trained with (``timm.data.resolve_data_config`` output);
            None keeps the model's own pretrained_cfg.
        label_names: class names in classifier order (e.g. the class folders), stored as config.json label_names.
        card: the model card; None writes no README.md.
        metadata: string metadata stored in the safetensors header.

    Returns:
        ``folder``.

    Raises:
        UsageError: timm older than 1.0.29 (see `MODEL_FOLDER_SUPPORTED`), ``label_names`` whose count is not the
            model's number of classes, or a ``folder`` that holds other files (replacing it would lose them).
    """
    if not MODEL_FOLDER_SUPPORTED:
        raise UsageError(f"The model folder needs timm >= 1.0.29 (save_config_for_hf with data_config); this is timm "
                         f"{timm.__version__}: pip install -U timm.")
    model = unwrap_model(model)
    if label_names is not None and len(label_names) != model.num_classes:
        raise UsageError(f"{len(label_names)} label names for a model with {model.num_classes} classes; "
                         "pass one name per class, in classifier order.")
    # a symlink is replaced, not emptied: what the folder it points to holds is not lost
    real_folder = os.path.isdir(folder) and not os.path.islink(folder)
    others = sorted(set(os.listdir(folder)) - {CONFIG_FILE, WEIGHTS_FILE, CARD_FILE}) if real_folder else []
    if others:
        raise UsageError(f"'{folder}' holds other files than a model folder's ({', '.join(others[:3])}); save the "
                         "model folder into a new or empty folder.")
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    new = new_folder_for(folder)
    save_safetensors_atomic(get_state_dict(model), os.path.join(new, WEIGHTS_FILE), metadata)
    # the tag names the architecture's published weights, which these are not
    model_config: Dict[str, Any] = {'pretrained_cfg': {'tag': None}}
    if label_names is not None:
        model_config['label_names'] = list(label_names)
    with atomic_write(os.path.join(new, CONFIG_FILE)) as tmp_path:
        save_config_for_hf(model, tmp_path, model_config=model_config, data_config=data_config)
    if card is not None:
        with atomic_write(os.path.join(new, CARD_FILE)) as tmp_path:
            with open(tmp_path, 'w', encoding='utf-8') as f:
                f.write(render_model_card(card, folder))
    replace_folder(new, folder)
    return folder


# a config.json holds names and settings, a few MB for 22k class names at most; past this it is not one
_CONFIG_MAX_BYTES = 64 * 2 ** 20


def model_folder_of(name: str) -> Optional[str]:
    """The folder of a ``local-dir:<folder>`` model name (timm's source prefix, any case); None for other names."""
    source, sep, path = name.partition(':')
    return path if sep and source.lower() == LOCAL_DIR_PREFIX[:-1] else None


def model_folder_weights(folder: str) -> Optional[str]:
    """The weights file timm loads from ``folder`` (its preferred names, model.safetensors first); None if none."""
    return next((os.path.join(folder, name) for name in _PREFERRED_FILES if os.path.isfile(os.path.join(folder, name))),
                None)


def _check_config_values(config: Any, path: str) -> None:
    """The keys of a model folder's config.json that this package reads have the types timm writes: the file is an
    object, ``num_classes`` a count, ``label_names`` (top level or in ``pretrained_cfg``) one string per class, and
    ``pretrained_cfg.input_size`` (C, H, W) counts; UsageError naming the file and the key."""
    def refuse(key: str, wrong: str) -> None:
        raise UsageError(f"'{path}': key '{key}' {wrong}; correct it, or export the model folder again.")

    if not isinstance(config, dict):
        raise UsageError(f"'{path}' holds a JSON {type(config).__name__}, not an object; export the model folder again.")
    num_classes = config.get('num_classes')
    if num_classes is not None and (type(num_classes) is not int or num_classes < 0):
        refuse('num_classes', f'must be a count of classes, got {num_classes!r}')
    pretrained_cfg = config.get('pretrained_cfg', {})
    if not isinstance(pretrained_cfg, dict):
        refuse('pretrained_cfg', f'must be an object, got {type(pretrained_cfg).__name__}')
    for key, names in (('label_names', config.get('label_names')),
                       ('pretrained_cfg.label_names', pretrained_cfg.get('label_names'))):
        if names is None:
            continue
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            refuse(key, f'must be a list of strings (one class name each), got {str(names)[:80]}')
        if num_classes is not None and len(names) != num_classes:
            refuse(key, f"has {len(names)} names, but 'num_classes' is {num_classes}")
    size = pretrained_cfg.get('input_size')
    if size is not None and not (isinstance(size, list) and len(size) == 3
                                 and all(type(n) is int and n > 0 for n in size)):
        refuse('pretrained_cfg.input_size', f'must be [channels, height, width] of positive integers, got {size!r}')


def check_model_folder(folder: str) -> Dict[str, Any]:
    """The parsed config.json of a model folder timm can build and load; reads no tensors.

    Raises:
        UsageError: the folder, its config.json or its weights are missing or unreadable, or config.json names an
            architecture this timm does not know.
    """
    hint = 'pass the model/ folder of a timm-sadistill train run (<output>/<experiment>/model)'
    if not os.path.isdir(folder):
        raise UsageError(f"Model folder '{folder}' does not exist; {hint}.")
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise UsageError(f"Model folder '{folder}' has no {CONFIG_FILE}; {hint}, or write one with "
                         "timm.models.save_for_hf.")
    try:
        if os.path.getsize(config_path) > _CONFIG_MAX_BYTES:
            raise ValueError(f'{os.path.getsize(config_path)} bytes, more than a config.json holds '
                             f'({_CONFIG_MAX_BYTES} at most)')
        with open(config_path, encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise UsageError(f"'{config_path}' cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         f"{hint}.") from e
    _check_config_values(config, config_path)
    architecture = config.get('architecture')
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise UsageError(f"'{config_path}' names architecture {architecture!r}, which timm {timm.__version__} does not "
                         "know; upgrade timm or correct it (timm.list_models('*pattern*') lists the names).")
    weights = model_folder_weights(folder)
    if weights is None:
        raise UsageError(f"Model folder '{folder}' has no weights ({WEIGHTS_FILE}); {hint}.")
    check_checkpoint_readable(weights, 'Model weights')
    return config


@dataclass(frozen=True)
class ModelName:
    """What a model name names, as `resolve_model_name` decided it.

    Args:
        name: the name as given (``resnet18``, ``resnet18.a1_in1k``, ``local-dir:<folder>``, ``hf-hub:<repo>``).
        architecture: the timm architecture it builds.
        config: the parsed config.json of a model folder (``local-dir:``) or of a Hub repo in the local cache
            (``hf-hub:``); such a name brings its weights, classes and preprocessing. None for a registry name.
        load_name: the name to give ``timm.create_model``: a cached Hub repo loads as the model folder of its
            snapshot, so that timm does not reach the Hub; else ``name``.
    """
    name: str
    architecture: str
    config: Optional[Dict[str, Any]] = None
    load_name: Optional[str] = None

    def __post_init__(self):
        if self.load_name is None:
            object.__setattr__(self, 'load_name', self.name)

    @property
    def has_weights(self) -> bool:
        return self.config is not None

    @property
    def num_classes(self) -> Optional[int]:
        return (self.config or {}).get('num_classes')

    @property
    def label_names(self) -> Optional[List[str]]:
        """The class names in classifier order the config.json lists (as a train run's model folder does)."""
        names = (self.config or {}).get('label_names') or (self.config or {}).get('pretrained_cfg', {}).get('label_names')
        return list(names) if names else None


def _cached_hub_folder(repo: str) -> Optional[str]:
    """The snapshot folder of Hub repo ``repo`` (``owner/name[@revision]``) in the local cache, if its config.json
    is there."""
    from huggingface_hub import try_to_load_from_cache
    repo_id, _, revision = repo.partition('@')
    path = try_to_load_from_cache(repo_id, CONFIG_FILE, revision=revision or None)
    return os.path.dirname(path) if isinstance(path, str) else None


def hub_offline() -> bool:
    """True when the Hugging Face Hub may not be reached (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def resolve_model_name(
        name: str,
        option: str = 'model',
        allow_download: bool = False,
        download_option: str = 'pretrained=True',
) -> ModelName:
    """Decide what a model name names, the one rule for every model name the library and the command line take.

    A timm registry name (tags allowed) is an architecture; ``local-dir:<folder>`` is a model folder (checked by
    `check_model_folder`); ``hf-hub:<repo>`` is a Hub repo, read from the local cache: nothing is downloaded unless
    ``allow_download`` (the caller's leave to download, e.g. ``--teacher-pretrained``) and the Hub is reachable.

    Args:
        name: the model name.
        option: the caller's word for it in messages (``--teacher``, ``teacher_model``).
        allow_download: a Hub repo missing from the cache may be fetched by timm.
        download_option: the caller's word for that leave, for the message.

    Raises:
        UsageError: an unknown architecture, a folder given without ``local-dir:``, a bad folder, a Hub repo
            that is not in the cache.
    """
    if not isinstance(name, str) or not name:
        raise UsageError(f"{option}: a model name is a timm architecture, local-dir:<folder> or hf-hub:<repo>, "
                         f"got {name!r}.")
    source, sep, path = name.partition(':')
    source = source.lower().replace('_', '-')
    if sep and source == LOCAL_DIR_PREFIX[:-1]:
        config = check_model_folder(path)
        return ModelName(name, config['architecture'], config)
    if sep and source == 'hf-hub':
        folder = _cached_hub_folder(path)
        if folder is not None:
            config = check_model_folder(folder)
            return ModelName(name, config['architecture'], config, load_name=LOCAL_DIR_PREFIX + folder)
        if allow_download and not hub_offline():
            from timm.models._hub import load_model_config_from_hf
            return ModelName(name, load_model_config_from_hf(path)[1])
        why = 'HF_HUB_OFFLINE is set' if hub_offline() else f'not without {download_option}'
        raise UsageError(f"{option} '{name}' is not in the local Hugging Face cache; nothing is downloaded ({why}). "
                         f"Download it once (hf download {path.partition('@')[0]}) or pass a model folder as "
                         "local-dir:<folder>.")
    if os.path.isdir(name):
        as_timm = f"{option} local-dir:{name}" if option.startswith('-') else f"local-dir:{name}"
        raise UsageError(f"{option} '{name}' is a folder; name it as timm does: {as_timm}.")
    if not timm.is_model(name):
        raise UsageError(f"Unknown model '{name}' ({option}); find timm model names with timm.list_models, e.g. "
                         f"python -c \"import timm; print(timm.list_models('*{name[:6]}*'))\".")
    return ModelName(name, name)


def check_pretrained_available(name: str, option: str = 'pretrained=True') -> None:
    """Refuse leave to load the published weights of registry name ``name`` where there are none (timm would warn
    and go on with random weights), or where the Hub is off (``HF_HUB_OFFLINE=1``) and they are not in the local
    cache (timm would fail deep in the download), naming ``option`` (``--pretrained``, ``--teacher-pretrained``)."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise UsageError(f"{option}: timm has no pretrained weights for '{name}'; drop {option} or pick a model "
                         "that has them (timm.list_pretrained('*pattern*')).")
    if not hub_offline() or (cfg.file and os.path.isfile(cfg.file)):
        return
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        repo_id, _, revision = cfg.hf_hub_id.partition('@')
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else _PREFERRED_FILES
        if any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision or None), str) for f in files):
            return
    if cfg.url:
        import torch.hub
        if os.path.isfile(os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(cfg.url))):
            return
    raise UsageError(f"{option}: the pretrained weights of '{name}' ({cfg.hf_hub_id or cfg.url}) are not in the "
                     "local cache and HF_HUB_OFFLINE is set, so nothing is downloaded; unset HF_HUB_OFFLINE to "
                     f"download them, or drop {option}.")
