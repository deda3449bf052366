"""The acceptance targets the benchmarks check their measurements against, in one place."""

# The noise level (sigma, on the 0-255 scale) at which the quality targets are checked, on the skimage photos.
TARGET_SIGMA = 25.0

# `best` (the widest sub-network) must beat FFDNet (given the true sigma) by at least this PSNR, in dB.
BEST_MIN_GAIN_OVER_FFDNET_DB = 0.0

# `fast` (the slimmest sub-network) must beat CBM3D by at least this PSNR, in dB.
FAST_MIN_GAIN_OVER_CBM3D_DB = 0.0

# `auto` (the gate's pick) may fall at most this far below `best`'s PSNR, in dB.
AUTO_MAX_DROP_DB = 0.05

# `auto` may spend at most this fraction of `best`'s FLOPs per pixel (gate included).
AUTO_MAX_FLOPS_FRACTION = 0.6

# HTTP throughput at the highest concurrency measured must be at least this fraction of the raw model loop's.
SERVE_MIN_FRACTION_OF_RAW = 0.9

# On every degradation other than AWGN (JPEG, Poisson-Gaussian, spatially variant, downscaled), `auto` must
# reach at least FFDNet's PSNR when FFDNet is given the noise's RMS as its sigma, plus this, in dB.
AUTO_MIN_GAIN_OVER_FFDNET_RMS_DB = 0.0

# A candidate checkpoint may lose at most this much PSNR to the shipped one on AWGN, at any sigma, view
# scale and quality, in dB (benchmarks.ship, on the validation photos).
AWGN_MAX_DROP_DB = 0.05

# Through the CLI's code path on the test photos (benchmarks.speed): `auto`'s and `fast`'s megapixels per
# second must be at least these multiples of FFDNet's.
SPEED_AUTO_VS_FFDNET = 2.0
SPEED_FAST_VS_FFDNET = 3.5

# Each sub-network's time, as a fraction of the widest's, may differ from its FLOPs fraction by at most this
# share of it (benchmarks.speed, one 512x512 image).
SPEED_MAX_DEVIATION_FROM_FLOPS = 0.25
