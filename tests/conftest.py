import pytest
import torch

CUDA = torch.cuda.is_available()

# Every device-parametrised test runs on CPU, and on CUDA where a GPU is visible; the CUDA
# cases skip with a reason elsewhere (the CUDA kernels are compiled but cannot run there).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="no CUDA GPU visible: CUDA kernels not exercised"))]


def native_fp16_gemm():
    """Whether ATen multiplies CPU fp16 natively (its own test, asked the way csrc/cpu/runtime/gemm.cpp
    asks it; a torch without oneDNN: no). Without it our CPU kernels run fp16 GEMMs in fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


# Tolerances by dtype: fp64 1e-10, fp32 1e-5, 16-bit about 1e-2 (README, "Testing").
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def rel_error(actual, expected, tol):
    """assert_rel's relative error on the scale of the result. For tol < 1e-3 (fp32/fp64) it
    is max|a - e| / max|e|; for the 16-bit tolerances it is ||a - e|| / ||e||, because a 16-bit
    pre-activation that rounds to the other side of relu's kink flips one element of the
    derivative, which the norm absorbs while the max does not. 0 for empty tensors."""
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return 0.0
    if tol < 1e-3:
        return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_rel(actual, expected, tol, what=""):
    """actual's rel_error against expected at most tol, every value finite."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_error(actual, expected, tol)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def poison_cuda_cache():
    """Fill the CUDA caching allocator's free blocks with NaN so that an output element a
    kernel fails to write shows up as NaN instead of a stale, plausible value."""
    if CUDA:
        t = torch.full((32 * 1024 * 1024,), float("nan"), device="cuda")
        del t


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    poison_cuda_cache()
    yield


@pytest.fixture
def one_blas_thread():
    """scikit-learn's fits on one OpenBLAS thread (modules that compare with scikit-learn use it
    for every test: pytestmark = pytest.mark.usefixtures("one_blas_thread")): on the shared
    2-core machine its spinning pool made reference fits 50x slower under load. Results do not
    depend on it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
