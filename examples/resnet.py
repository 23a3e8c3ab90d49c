"""A torchvision ResNet-18 (10 classes, 32x32 inputs) as a MODEL.py for the CLI.

    dynlora-transform examples/resnet.py --dry-run
    dynlora-transform examples/resnet.py --train 50 --onnx runs/resnet.onnx

Training data is synthetic (seeded noisy copies of ten fixed random patterns, labelled with
their pattern, 20% of the labels random), so the example runs anywhere without downloads; the
label noise puts a floor under the loss, so full-rank and adapted runs compare by ratio.
"""

from typing import Iterator

import torch
import torch.nn.functional as F
import torchvision

BATCH_SIZE = 16
LABEL_NOISE = 0.2  # fraction of labels drawn at random


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    patterns = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(42))
    labels = torch.randint(0, 10, (BATCH_SIZE,), generator=gen)
    images = 0.5 * torch.randn(BATCH_SIZE, 3, 32, 32, generator=gen) + patterns[labels]
    # 20% of the labels are random: no model gets below ~0.87 nats, so losses stay comparable
    noisy = torch.rand(BATCH_SIZE, generator=gen) < LABEL_NOISE
    labels = torch.where(noisy, torch.randint(0, 10, (BATCH_SIZE,), generator=gen), labels)
    return images, labels


def example_inputs() -> tuple:
    return (_batch(torch.Generator().manual_seed(1))[0][:2],)


def batches() -> Iterator[tuple]:
    gen = torch.Generator().manual_seed(0)
    while True:
        yield _batch(gen)


def val_batches() -> list:
    gen = torch.Generator().manual_seed(123)
    return [_batch(gen) for _ in range(4)]


def loss_fn(output: torch.Tensor, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(output, batch[1])
