import logging
import os

# Before anything imports triton (timm does): run the kernels on the CPU (a GPU run sets TRITON_INTERPRET=0
# explicitly), and never reach the hub.
os.environ.setdefault('TRITON_INTERPRET', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def timm_script(variable: str, name: str) -> str:
    """timm's own, unmodified ``name`` (train.py, validate.py: not in timm's wheel): the path in ``variable``, else
    the copy in ``../shared/timm/`` beside the checkout, which CI always has; '' when neither exists."""
    shared = Path(__file__).resolve().parents[2] / 'shared' / 'timm' / name
    return os.environ.get(variable) or (str(shared) if shared.is_file() else '')


TIMM_TRAIN_PY = timm_script('TSD_TIMM_TRAIN_PY', 'train.py')
TIMM_VALIDATE_PY = timm_script('TSD_TIMM_VALIDATE_PY', 'validate.py')


@pytest.fixture(autouse=True)
def _keep_logging():
    """`train`'s main adds a root log handler bound to the test's captured stderr: every test leaves the root
    handlers as it found them, so that no later test logs to a closed stream."""
    handlers = list(logging.root.handlers)
    yield
    logging.root.handlers[:] = handlers


def make_pattern_images(num_classes: int = 4, per_class: int = 8, size: int = 64, seed: int = 0):
    """Separable generated images: class k brightens quadrant k (and tints a channel), plus noise.

    Returns (images (N, 3, size, size) normalised roughly to zero mean, labels (N,)).
    """
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    half = size // 2
    for k in range(num_classes):
        for _ in range(per_class):
            img = 0.3 * torch.randn(3, size, size, generator=g)
            r, c = divmod(k % 4, 2)
            img[:, r * half:(r + 1) * half, c * half:(c + 1) * half] += 1.5
            img[k % 3] += 0.5
            images.append(img)
            labels.append(k)
    return torch.stack(images), torch.tensor(labels)


@pytest.fixture(scope='session')
def pattern_data():
    return make_pattern_images()


def train_steps(task_or_model, images, labels, steps: int, lr: float = 1e-3, batch_size: int = 16, seed: int = 0):
    """AdamW steps over shuffled mini-batches; returns the list of result dicts (detached floats)."""
    from timm_sadistill import DistillTask
    torch.manual_seed(seed)
    is_task = isinstance(task_or_model, DistillTask)
    module = task_or_model.trainable_module if is_task else task_or_model
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    task_or_model.train()
    history = []
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=g)[:batch_size]
        x, y = images[idx], labels[idx]
        if is_task:
            out = task_or_model(x, y)
        else:
            logits = task_or_model(x)
            out = {'loss': torch.nn.functional.cross_entropy(logits, y)}
        opt.zero_grad()
        out['loss'].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in out.items() if k != 'output'})
    return history


@pytest.fixture(scope='session')
def trained_teachers(pattern_data):
    """Teachers fitted to the pattern data, so that their logits and features carry the classes."""
    import timm
    images, labels = pattern_data
    teachers = {}
    for name in ('resnet18', 'test_convnext'):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=4)
        train_steps(model, images, labels, steps=30, lr=3e-3)
        model.eval()
        teachers[name] = model
    return teachers
