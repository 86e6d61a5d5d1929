from typing_extensions import Buffer

KERNELS: str

def vertical(
    x: Buffer, out: Buffer, length: int, cols: int, radius: int, coeffs: Buffer
) -> None: ...
def horizontal(
    x: Buffer, out: Buffer, length: int, cols: int, radius: int, coeffs: Buffer
) -> None: ...
def to_xyb(
    linear: Buffer, out: Buffer, pixels: int, matrix: Buffer, bias: float, neg_bias_cbrt: float
) -> None: ...
def error_sums(
    blurred: Buffer,
    dist: Buffer,
    mu: Buffer,
    edge: Buffer,
    variance: Buffer,
    pixels: int,
    means: Buffer,
    ssim_at: Buffer,
    sums: Buffer,
) -> None: ...
def blur_stack(
    xyb: Buffer,
    ref: Buffer | None,
    height: int,
    width: int,
    means: Buffer,
    ssim: Buffer,
    out: Buffer,
    radius: int,
    coeffs: Buffer,
) -> None: ...
def downsample(linear: Buffer, out: Buffer, height: int, width: int) -> None: ...
def use_kernels(name: str) -> str: ...
