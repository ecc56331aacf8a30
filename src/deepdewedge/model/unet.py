"""3D U-Net with its input normalisation kept as buffers."""

from __future__ import annotations

import torch
from torch import nn

_SLOPE = 0.05
# Floor of a per-input standard deviation, in the model's standardised units: a constant
# input (e.g. an empty tile) is passed through instead of divided by zero.
_MIN_SCALE = 1e-6


def _conv_stack(channels: list[int], drop_prob: float) -> nn.Sequential:
    """3×3×3 convolutions through `channels`, each followed by norm, dropout and leaky ReLU."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        layers += [
            nn.Conv3d(c_in, c_out, kernel_size=3, padding=1),
            nn.InstanceNorm3d(c_out),
            nn.Dropout3d(drop_prob),
            nn.LeakyReLU(_SLOPE, inplace=True),
        ]
    return nn.Sequential(*layers)


class UNet3D(nn.Module):
    """U-Net for volumes in the layout DeepDeWedge and IsoNet use.

    Each level has three convolutions; down-sampling is a strided 3×3×3 convolution and
    up-sampling a transposed one; skip connections are concatenated. With ``chans=64`` and
    three down-sampling layers the network has 27.3 M parameters, the size the paper reports.

    Parameters
    ----------
    chans
        Channels of the first level, doubled at each down-sampling (paper: 64).
    num_downsample_layers
        Number of 2× down-samplings (paper: 3). Input sizes must be divisible by
        ``2 ** num_downsample_layers``.
    drop_prob
        Dropout probability after each convolution (paper: 0 for DeepDeWedge).
    residual
        Add the input to the output, so that the network learns a correction of its input
        (the published implementation's choice; off by default, see docs/method.md).
    affine_equivariant
        Standardise each input by its own mean and standard deviation and give the output
        that mean and scale back, so that ``f(a·x + b) = a·f(x) + b`` for ``a > 0``. The
        instance norm after every convolution makes the bare network blind to both: its
        output has the same mean and contrast whatever the input's, which erases the
        variations of brightness and contrast between tiles (the large-scale content of a
        tomogram) on real data.
    """

    def __init__(
        self,
        *,
        chans: int = 64,
        num_downsample_layers: int = 3,
        drop_prob: float = 0.0,
        residual: bool = False,
        affine_equivariant: bool = False,
    ) -> None:
        super().__init__()
        self.num_downsample_layers = num_downsample_layers
        self.residual = residual
        self.affine_equivariant = affine_equivariant
        widths = [chans * 2**level for level in range(num_downsample_layers)]
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        c_in = 1
        for c in widths:
            self.down.append(_conv_stack([c_in, c, c, c], drop_prob))
            self.pool.append(
                nn.Sequential(
                    nn.Conv3d(c, c, kernel_size=3, stride=2, padding=1),
                    nn.LeakyReLU(_SLOPE, inplace=True),
                )
            )
            c_in = c
        c = widths[-1]
        self.bottleneck = nn.Sequential(
            nn.Conv3d(c, 2 * c, kernel_size=3, padding=1),
            nn.LeakyReLU(_SLOPE, inplace=True),
            nn.Conv3d(2 * c, c, kernel_size=3, padding=1),
        )
        self.unpool = nn.ModuleList()
        self.up = nn.ModuleList()
        c_below = c
        for c in reversed(widths):
            self.unpool.append(
                nn.ConvTranspose3d(c_below, c, kernel_size=3, stride=2, padding=1, output_padding=1)
            )
            self.up.append(_conv_stack([2 * c, c, c, c], drop_prob))
            c_below = c
        self.head = nn.Conv3d(widths[0], 1, kernel_size=1)
        self.act = nn.LeakyReLU(_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map `(b, 1, d, h, w)` to `(b, 1, d, h, w)`."""
        if self.affine_equivariant:
            flat = x.float().flatten(1)
            loc = flat.mean(dim=1).view(-1, 1, 1, 1, 1)
            scale = flat.std(dim=1).clamp_min(_MIN_SCALE).view(-1, 1, 1, 1, 1)
            out = self._core(((x - loc) / scale).to(x.dtype))
            return out.float() * scale + loc
        return self._core(x)

    def _core(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        out = x
        for block, pool in zip(self.down, self.pool, strict=True):
            out = block(out)
            skips.append(out)
            out = pool(out)
        out = self.bottleneck(out)
        for unpool, block in zip(self.unpool, self.up, strict=True):
            out = block(self.act(torch.cat([unpool(out), skips.pop()], dim=1)))
        out = self.head(out)
        return out + x if self.residual else out


class DeWedgeModel(nn.Module):
    """The fitted network f_θ: standardise the input, apply the U-Net, undo the scaling.

    The normalisation statistics (``input_loc``, ``input_scale``) are buffers, so they
    travel with the checkpoint; refinement may replace them per tomogram.
    """

    def __init__(self, **unet_params: float) -> None:
        super().__init__()
        self.unet = UNet3D(**unet_params)  # type: ignore[arg-type]
        self.register_buffer("input_loc", torch.tensor(0.0))
        self.register_buffer("input_scale", torch.tensor(1.0))

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the network accepts are multiples of this."""
        return 2**self.unet.num_downsample_layers

    def set_normalization(self, loc: float, scale: float) -> None:
        """Set the input standardisation ``(x - loc) / scale``."""
        if not scale > 0:
            raise ValueError(f"normalisation scale must be positive, got {scale}")
        self.input_loc.fill_(float(loc))
        self.input_scale.fill_(float(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map `(b, 1, d, h, w)` volumes to refined volumes of the same shape and units."""
        z = (x - self.input_loc) / self.input_scale
        return self.unet(z).float() * self.input_scale + self.input_loc


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
