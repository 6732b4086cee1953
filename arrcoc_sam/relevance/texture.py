"""The ARR-COC v0.1 texture array: 13 hand-crafted channels per cell of a square grid, computed in torch.

Channels (in this order, see `TEXTURE_CHANNELS`): sRGB R, G, B; CIELAB L* and a*; Sobel gx, gy and gradient
magnitude of the luminance; cell-centre y and x in [0, 1]; eccentricity (distance from the image centre,
1 at the corners); saliency (frequency-tuned: distance in LAB between the blurred pixel and the image's mean
colour, Achanta et al. 2009); Rec. 709 luma. Pixel-level channels are average-pooled to the grid.
Everything is per sample: no statistic is ever taken across the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEXTURE_CHANNELS: tuple[str, ...] = (
    "red", "green", "blue", "lab_l", "lab_a", "sobel_gx", "sobel_gy", "sobel_magnitude",
    "y", "x", "eccentricity", "saliency", "luminance",
)
NUM_TEXTURE_CHANNELS = len(TEXTURE_CHANNELS)
SOBEL_MAGNITUDE_CHANNEL = TEXTURE_CHANNELS.index("sobel_magnitude")

# sRGB (D65) -> CIE XYZ, and the D65 reference white.
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_LUMA_709 = (0.2126, 0.7152, 0.0722)
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] RGB in [0, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor in [0, 1], got dtype {images.dtype}")


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """CIELAB (D65) of sRGB images: [B, 3, H, W] in [0, 1] -> [B, 3, H, W] as (L* in [0, 100], a*, b*)."""
    _check_images(images)
    rgb = images.clamp(0.0, 1.0)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=images.dtype, device=images.device)
    white = torch.tensor(_WHITE_D65, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / white
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta**3, xyz.clamp_min(delta**3) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def sobel(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives of [B, 1, H, W] images by convolution (replicate padding): (gx, gy), each [B, 1, H, W]."""
    kernel_x = torch.tensor(_SOBEL_X, dtype=gray.dtype, device=gray.device).view(1, 1, 3, 3)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel_x), F.conv2d(padded, kernel_x.transpose(2, 3))


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt of a non-negative tensor with gradient 0 (not NaN/inf) where ``x == 0``; same values as torch.sqrt."""
    positive = x > 0
    return torch.where(positive, x.clamp_min(torch.finfo(x.dtype).tiny).sqrt(), torch.zeros_like(x))


def normalize_per_sample(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each channel of each sample over its tokens: [B, N, C] -> [B, N, C] (zero mean, unit std).

    Idempotent up to `eps`; a channel constant within a sample maps to zeros (with finite gradients). Never
    mixes samples.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, C], got shape {tuple(tokens.shape)}")
    mean = tokens.mean(dim=1, keepdim=True)
    std = safe_sqrt(tokens.var(dim=1, keepdim=True, unbiased=False))
    return (tokens - mean) / (std + eps)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """[B, C, G, G] -> [B, G*G, C] in row-major cell order."""
    return grid.flatten(2).transpose(1, 2)


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, C] with N a perfect square -> [B, C, G, G] (inverse of `grid_to_tokens`)."""
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise ValueError(f"the number of tokens must be a perfect square (a G x G grid), got {tokens.shape[1]}")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def _position_channels(grid_size: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    centres = (torch.arange(grid_size, dtype=like.dtype, device=like.device) + 0.5) / grid_size
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    eccentricity = torch.sqrt((y - 0.5) ** 2 + (x - 0.5) ** 2) / (0.5**0.5)
    return torch.stack((y, x, eccentricity)).unsqueeze(0).expand(batch, -1, -1, -1)


def texture_array(images: torch.Tensor, grid_size: int = 32, normalize: bool = True) -> torch.Tensor:
    """The 13-channel texture array of sRGB images.

    Cells pool pixels with ``adaptive_avg_pool2d``: an exact area mean when H and W are multiples of G; otherwise
    neighbouring cells' windows overlap by up to a pixel, so a boundary pixel counts in both (labels computed by
    exact area fractions then differ slightly at cell borders). float16/bfloat16 images are computed in float32
    (bfloat16 alone is off by up to 0.26 standard units after normalisation) and returned in their own dtype.

    Args:
        images: [B, 3, H, W] float in [0, 1] (values outside are clamped), H and W >= grid_size.
        grid_size: G, cells per side (G*G tokens).
        normalize: standardise each channel per sample (`normalize_per_sample`).
    Returns:
        [B, 13, G, G], channels ordered as `TEXTURE_CHANNELS`, in the images' dtype.
    """
    _check_images(images)
    if grid_size < 1 or min(images.shape[-2:]) < grid_size:
        raise ValueError(f"grid_size must be in [1, min(H, W)={min(images.shape[-2:])}], got {grid_size}")
    if images.dtype in (torch.float16, torch.bfloat16):
        return texture_array(images.float(), grid_size, normalize).to(images.dtype)
    rgb = images.clamp(0.0, 1.0)
    lab = rgb_to_lab(rgb)
    luma = torch.tensor(_LUMA_709, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    luminance = (rgb * luma).sum(dim=1, keepdim=True)
    gx, gy = sobel(luminance)
    magnitude = safe_sqrt(gx**2 + gy**2)  # 0 on flat regions, with gradient 0 there instead of NaN
    blurred_lab = F.avg_pool2d(F.pad(lab, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    saliency = torch.linalg.vector_norm(blurred_lab - lab.mean(dim=(2, 3), keepdim=True), dim=1, keepdim=True)
    pixel_channels = torch.cat((rgb, lab[:, :2], gx, gy, magnitude, saliency, luminance), dim=1)
    pooled = F.adaptive_avg_pool2d(pixel_channels, grid_size)
    positions = _position_channels(grid_size, images.shape[0], pooled)
    grid = torch.cat((pooled[:, :8], positions, pooled[:, 8:]), dim=1)
    if normalize:
        grid = tokens_to_grid(normalize_per_sample(grid_to_tokens(grid)))
    return grid
