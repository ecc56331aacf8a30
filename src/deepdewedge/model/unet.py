"""3D U-Net with its input normalisation kept as buffers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv_block(c_in: int, c_out: int, drop_prob: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers += [
            nn.Conv3d(c, c_out, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm3d(c_out),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        if drop_prob > 0:
            layers.append(nn.Dropout3d(drop_prob))
    return nn.Sequential(*layers)


class UNet3D(nn.Module):
    """U-Net for volumes (Ronneberger et al.), the reference DeepDeWedge architecture.

    Parameters
    ----------
    chans
        Channels of the first level; doubled at each down-sampling (paper: 64).
    num_downsample_layers
        Number of 2× down-samplings (paper: 3). Input sizes must be divisible by
        ``2 ** num_downsample_layers``.
    drop_prob
        Dropout probability after each convolution (paper: 0 for DeepDeWedge).
    in_chans, out_chans
        Input and output channels.
    """

    def __init__(
        self,
        *,
        chans: int = 64,
        num_downsample_layers: int = 3,
        drop_prob: float = 0.0,
        in_chans: int = 1,
        out_chans: int = 1,
    ) -> None:
        super().__init__()
        self.num_downsample_layers = num_downsample_layers
        self.down = nn.ModuleList([_conv_block(in_chans, chans, drop_prob)])
        c = chans
        for _ in range(num_downsample_layers - 1):
            self.down.append(_conv_block(c, 2 * c, drop_prob))
            c *= 2
        self.bottleneck = _conv_block(c, 2 * c, drop_prob)
        self.up_transpose = nn.ModuleList()
        self.up = nn.ModuleList()
        for _ in range(num_downsample_layers):
            self.up_transpose.append(
                nn.Sequential(
                    nn.ConvTranspose3d(2 * c, c, kernel_size=2, stride=2, bias=False),
                    nn.InstanceNorm3d(c),
                    nn.LeakyReLU(0.2, inplace=True),
                )
            )
            self.up.append(_conv_block(2 * c, c, drop_prob))
            c //= 2
        self.head = nn.Conv3d(2 * c, out_chans, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map `(b, in_chans, d, h, w)` to `(b, out_chans, d, h, w)`."""
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.avg_pool3d(x, kernel_size=2)
        x = self.bottleneck(x)
        for transpose, block in zip(self.up_transpose, self.up, strict=True):
            x = block(torch.cat([transpose(x), skips.pop()], dim=1))
        return self.head(x)


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
