"""Distil any timm teacher into any timm student with SA, in plain Python, on generated images.

    python examples/distill_python.py [--teacher resnet18] [--student test_resnet] [--steps 30]

Takes about 15 s on 2 CPU cores: the teacher is first fitted to the generated data (a real run would load its
checkpoint with teacher_pretrained_path=...), then the student is distilled with SA's defaults.
"""
import argparse

import timm
import torch

import timm_sadistill as tsd


def generated_images(num_classes: int = 4, per_class: int = 16, size: int = 64, seed: int = 0):
    """Class k brightens image quadrant k: separable, so a few steps show learning."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = 0.3 * torch.randn(len(labels), 3, size, size, generator=g)
    half = size // 2
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k % 4, 2)
        images[i, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 1.5
    return images, labels


def fit(step_fn, params, images, labels, steps: int, lr: float):
    optimizer = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randperm(len(images), generator=g)[:16]
        out = step_fn(images[idx], labels[idx])
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
        yield step, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--teacher', default='resnet18')
    parser.add_argument('--student', default='test_resnet')
    parser.add_argument('--steps', type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = generated_images()
    num_classes = int(labels.max()) + 1

    teacher = timm.create_model(args.teacher, num_classes=num_classes)
    teacher.train()
    for _ in fit(lambda x, y: {'loss': torch.nn.functional.cross_entropy(teacher(x), y)},
                 teacher.parameters(), images, labels, args.steps, lr=3e-3):
        pass

    student = timm.create_model(args.student, num_classes=num_classes)
    print('stages of the student:', [(s.name, s.channels, s.reduction) for s in tsd.list_stages(student)])
    task = tsd.create_distill_task('sa', student, teacher, img_size=images.shape[-1], verbose=False)
    print('distilled pairs:', [f'{s.name}->{t.name}' for s, t in zip(task.student_stages, task.teacher_stages)])
    task.train()
    for step, out in fit(task, task.trainable_module.parameters(), images, labels, args.steps, lr=1e-3):
        if step % 10 == 0 or step == args.steps - 1:
            terms = ', '.join(f'{k} {out[k].item():.3f}' for k in ('loss', 'task_loss', 'sa_dist', 'sa_att', 'sa_kd'))
            print(f'step {step:3d}: {terms}')

    model = task.get_eval_model().eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    print(f'student train accuracy after {args.steps} SA steps: {accuracy:.1%}')


if __name__ == '__main__':
    main()
