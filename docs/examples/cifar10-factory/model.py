"""A small CIFAR-10 convnet for atlas, as the factory `model:cifar10_net` (run atlas from this
folder: atlas imports factories from the working directory).

Three VGG-style blocks (two 3x3 convolutions with BatchNorm and ReLU, then 2x2 max pooling)
of 64, 128 and 256 channels and a linear classifier on the flattened 256x4x4 map: the usual
small CIFAR-10 network. The factory returns a LoadedModel so that atlas normalizes the 32 px
images as CIFAR-10 training usually does and names the classes; change CIFAR10_MEAN and
CIFAR10_STD if your training normalized otherwise. (A factory returning `Cifar10Net()` alone
works too: atlas finds its 32 px input, which the flattened classifier requires, but feeds it
ImageNet's normalization and numbers its classes.) Your checkpoint comes with `weights`: a
state dict of Cifar10Net, as `torch.save(net.state_dict(), path)` writes it.
"""

from torch import nn

from atlas.models import InputNormalization, LoadedModel

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(),
        nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Cifar10Net(nn.Module):
    """32x32 RGB -> block1 (64x16x16) -> block2 (128x8x8) -> block3 (256x4x4) -> 10 logits."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.block1 = block(3, 64)
        self.block2 = block(64, 128)
        self.block3 = block(128, 256)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(256 * 4 * 4, classes)
        )

    def forward(self, x):
        return self.classifier(self.block3(self.block2(self.block1(x))))


def cifar10_net() -> LoadedModel:
    return LoadedModel(
        spec="model:cifar10_net",
        module=Cifar10Net(),
        normalize=InputNormalization.mean_std(CIFAR10_MEAN, CIFAR10_STD),
        input_size=(32, 32),
        labels=CIFAR10_CLASSES,
    )
