"""The acceptance targets the benchmarks check their measurements against, in one place."""

from training.config import AUTO_MAX_DROP_DB, AUTO_MAX_FLOPS_FRACTION  # noqa: F401 - targets, read from here

# The noise level (sigma, on the 0-255 scale) at which the quality targets are checked, on the skimage photos.
TARGET_SIGMA = 25.0

# `best` (the widest sub-network) must beat FFDNet (given the true sigma) by at least this PSNR, in dB.
BEST_MIN_GAIN_OVER_FFDNET_DB = 0.0

# `fast` (the slimmest sub-network) must beat CBM3D by at least this PSNR, in dB.
FAST_MIN_GAIN_OVER_CBM3D_DB = 0.0

# `auto` (the gate's pick) may fall at most AUTO_MAX_DROP_DB below `best`'s PSNR, in dB, and spend at most
# AUTO_MAX_FLOPS_FRACTION of `best`'s FLOPs per pixel (gate included): the rule stage 3 ships its gate by,
# defined with it in training/config.py.

# benchmarks.serve: HTTP throughput at the highest concurrency measured must be at least this fraction of the same
# engines' in-process throughput on the same decoded tensors; at concurrency 1, this fraction of the CLI's path;
# and a fresh `ddsnet serve` must answer /readyz 200 within this many seconds of its start.
SERVE_MIN_FRACTION_OF_RAW = 0.9
SERVE_MIN_FRACTION_OF_CLI = 0.9
SERVE_MAX_READY_SECONDS = 60.0

# On every degradation other than AWGN (JPEG, Poisson-Gaussian, spatially variant, downscaled), `auto` must
# reach at least FFDNet's PSNR when FFDNet is given the noise's RMS as its sigma, plus this, in dB.
AUTO_MIN_GAIN_OVER_FFDNET_RMS_DB = 0.0

# With noise profiles, the gate (or a JPEG file's header) must pick the profile right on at least this share of
# the validation photos of each noise (benchmarks.profiles). A choice is right when the chosen profile's widest
# sub-network is at most PROFILE_TOLERANCE_DB under the other's: the drop that `auto` may cost against `best`.
PROFILE_MIN_ACCURACY = 0.95
PROFILE_TOLERANCE_DB = AUTO_MAX_DROP_DB

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

# benchmarks.load, at twice the rate `auto` sustains, with the server's defaults (the latency controller on, and
# shedding): goodput at least this multiple of the controller's giving up width alone, p95 latency of the 200s at
# most this multiple of the target, and the answers' mean PSNR at most this far below unloaded `auto` on the
# same images.
LOAD_MIN_GOODPUT_VS_WIDTH = 1.0
LOAD_MAX_P95_OVER_TARGET = 1.2
LOAD_MAX_PSNR_LOSS_DB = 0.35

# What a user waits for (benchmarks.speed --cold): one `ddsnet denoise` process per quality over a folder of
# photos, wall time from outside, with a warm engine cache, against FFDNet's MPix/s in the same run.
COLD_AUTO_VS_FFDNET = 2.0
COLD_FAST_VS_FFDNET = 3.5
# One 512x512 photo from a fresh process, warm cache: auto's wall time over `--backend torch`'s.
COLD_ONE_PHOTO_VS_TORCH = 1.1
# Seconds from starting `ddsnet serve` to /readyz answering 200, on a warm cache.
COLD_SERVE_READY_S = 5.0

# benchmarks.load --scenario mixed, fair sharing on: with one client's 20 MP photo in flight, small photos'
# p95 latency at most the larger of these seconds and this multiple of their time alone.
MIXED_SMALL_MAX_S = 3.0
MIXED_SMALL_MAX_OVER_ALONE = 10.0
