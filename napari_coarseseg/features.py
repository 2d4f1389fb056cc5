"""ilastik's pixel features, from SciPy: the feature set of ilastik's pixel classification.

For an image I, a scale s and g_s the Gaussian of standard deviation s
(sampled on the pixel grid, truncated at ``TRUNCATE * s``), the six feature
families of ilastik (vigra's filters) are, with d_i the derivative along
spatial axis i and * the convolution:

    gaussian                  G_s      = g_s * I
    laplacian_of_gaussian     LoG_s    = sum_i  d_i d_i g_s * I
    gradient_magnitude        GGM_s    = sqrt( sum_i (d_i g_s * I)^2 )
    difference_of_gaussians   DoG_s    = g_s * I - g_{0.66 s} * I
    structure_tensor          ST_s     = g_{s/2} * (grad_s I  grad_s I^T),   grad_s I = (d_i g_s * I)_i
    hessian                   H_s      = (d_i d_j g_s * I)_ij

and of the two tensors (2 x 2 in 2-D, 3 x 3 in 3-D) the features are the
eigenvalues, sorted in decreasing order: ``eig0 >= eig1 (>= eig2)``, as
vigra sorts them. The structure tensor has inner scale s (the gradient) and
outer scale s / 2 (the averaging of its outer product), and the difference
of Gaussians subtracts the scale 0.66 s, as ilastik sets them.

The scales are ilastik's, ``ILASTIK_SIGMAS = (0.3, 0.7, 1.0, 1.6, 3.5, 5.0,
10.0)``; like ilastik, the Gaussian is computed at every scale and the five
other families only at the scales >= 0.7 (at 0.3 a derivative kernel spans
one pixel each side and means little). With every family in 2-D that is
7 + 6 * (1 + 1 + 1 + 2 + 2) = 49 features; in 3-D, 7 + 6 * (1 + 1 + 1 + 3 + 3)
= 61.

The kernels. Smoothing uses exactly SciPy's kernel, so that ``gaussian`` is
``scipy.ndimage.gaussian_filter(I, s)``. The derivative kernels follow vigra
rather than SciPy: the sampled derivative of the Gaussian, its mean removed
and scaled so that it differentiates the matching monomial exactly,

    sum_t k_n(t) = 0,        sum_t k_n(t) t^n / n! = 1       (n = 1, 2).

SciPy's kernels skip this, and it shows: the Laplacian of Gaussian of a
constant image is -1 % of its value at s = 0.7, and the second derivative of
x^2 is 1 % short at s = 10. With the correction a constant gives exactly 0
and a quadratic a*x^2 + b*y^2 gives exactly the Hessian diag(2b, 2a) away
from the border (up to float32 rounding), at every scale.

Border handling is SciPy's ``mode="reflect"`` (the image mirrored, the edge
pixel repeated) for every filter, so scales larger than the image work too.
vigra truncates its kernels at about (3 + order / 2) s, SciPy at 4 s; the
Gaussian mass between the two is under 0.3 %.

Every derivative needed at one scale comes from one tree of separable 1-D
passes that shares its partial results (in 2-D: 9 passes for G, the 2
first and the 3 second derivatives instead of 12), each pass one C call over
the whole image; the eigenvalues are closed-form and vectorised. Features
are written into one preallocated float32 array, (..., F).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations_with_replacement

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "DOG_RATIO",
    "FAMILIES",
    "ILASTIK_SIGMAS",
    "MIN_DERIVATIVE_SIGMA",
    "STRUCTURE_OUTER_RATIO",
    "TRUNCATE",
    "feature_names",
    "ilastik_features",
]

ILASTIK_SIGMAS = (0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
FAMILIES = (
    "gaussian",
    "laplacian_of_gaussian",
    "gradient_magnitude",
    "difference_of_gaussians",
    "structure_tensor",
    "hessian",
)
# ilastik offers sigma 0.3 for the Gaussian only; the other families start at 0.7.
MIN_DERIVATIVE_SIGMA = 0.7
# ilastik's difference of Gaussians: G_s - G_{0.66 s}; its structure tensor: outer scale s / 2.
DOG_RATIO = 0.66
STRUCTURE_OUTER_RATIO = 0.5
# SciPy's default truncation, so the Gaussian feature is scipy.ndimage.gaussian_filter.
TRUNCATE = 4.0
_MODE = "reflect"
# The 3-D eigenvalues run in float64 on blocks of this many voxels: bounded temporaries for any volume.
_EIGEN_BLOCK = 1 << 17
# Eigenvalues per tensor, by spatial dimension.
_N_EIGEN = {2: 2, 3: 3}


def _check_settings(sigmas, families, spatial_ndim):
    """``(sigmas, families, spatial_ndim)`` checked and as tuples; one ValueError naming the problem."""
    if spatial_ndim not in (2, 3) or isinstance(spatial_ndim, bool):
        raise ValueError(f"spatial_ndim must be 2 or 3, got {spatial_ndim!r}")
    try:
        values = np.atleast_1d(np.asarray(sigmas, dtype=np.float64))
    except (TypeError, ValueError):
        values = np.array([np.nan])  # not numbers: refused below with the value as given
    if values.ndim != 1 or values.size == 0 or not (np.isfinite(values) & (values > 0)).all():
        raise ValueError(f"sigmas must be positive finite numbers, got {sigmas!r}")
    if np.unique(values).size != values.size:
        raise ValueError(f"sigmas must be distinct, got {sigmas!r}")
    families = (families,) if isinstance(families, str) else tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown feature family {unknown[0]!r}; the families are {', '.join(FAMILIES)}")
    if not families or len(set(families)) != len(families):
        raise ValueError(f"families must name at least one family, each once, got {families!r}")
    if not any(f == "gaussian" or s >= MIN_DERIVATIVE_SIGMA for f in families for s in values):
        raise ValueError(f"no features: the families {families} are computed at sigmas >= "
                         f"{MIN_DERIVATIVE_SIGMA} only, got sigmas {sigmas!r}")
    return tuple(float(s) for s in values), families, int(spatial_ndim)


def _layout(sigmas, families, spatial_ndim):
    """``(family, sigma, eigenvalue index or None)`` of every feature, in output order."""
    layout = []
    for family in families:
        for sigma in sigmas:
            if family != "gaussian" and sigma < MIN_DERIVATIVE_SIGMA:
                continue
            if family in ("structure_tensor", "hessian"):
                layout.extend((family, sigma, k) for k in range(_N_EIGEN[spatial_ndim]))
            else:
                layout.append((family, sigma, None))
    return layout


def feature_names(sigmas=ILASTIK_SIGMAS, families=FAMILIES, spatial_ndim=2) -> list[str]:
    """Names of the features of :func:`ilastik_features`, in its order.

    Parameters
    ----------
    sigmas, families, spatial_ndim
        As for :func:`ilastik_features`.

    Returns
    -------
    list of str
        ``"<family> s=<sigma>"``, and ``"<family> eig<k> s=<sigma>"`` for
        the eigenvalues (k = 0 the largest). Families in the order given,
        sigmas in the order given within each family.

    Raises
    ------
    ValueError
        If a sigma is not positive and finite, a family is unknown, or
        ``spatial_ndim`` is not 2 or 3.

    Examples
    --------
    >>> feature_names(sigmas=(0.3, 1.0), families=("gaussian", "hessian"))
    ['gaussian s=0.3', 'gaussian s=1.0', 'hessian eig0 s=1.0', 'hessian eig1 s=1.0']
    >>> len(feature_names()), len(feature_names(spatial_ndim=3))
    (49, 61)
    """
    layout = _layout(*_check_settings(sigmas, families, spatial_ndim))
    return [f"{family} s={sigma}" if k is None else f"{family} eig{k} s={sigma}" for family, sigma, k in layout]


@lru_cache(maxsize=128)
def _kernel(sigma: float, order: int) -> np.ndarray:
    """Correlation weights of the 1-D Gaussian (order 0) or its derivative (order 1, 2), radius ``TRUNCATE * s``.

    Order 0 is SciPy's kernel. Orders 1 and 2 are made exact on polynomials
    (module docstring): zero sum, and ``sum k(t) t^n / n! = 1``.
    """
    radius = int(TRUNCATE * sigma + 0.5)  # SciPy's radius, so order 0 matches gaussian_filter bit for bit
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 * (t / sigma) ** 2)
    if order == 0:
        weights = phi / phi.sum()
    else:
        # d^n/dt^n of the Gaussian up to a constant factor, taken with t as the offset of the correlation.
        weights = (t if order == 1 else t * t - sigma * sigma) * phi
        weights -= weights.mean()  # the DC part: a constant image must give 0 (it is 0 by symmetry for n = 1)
        weights /= (weights * t**order).sum() / (1 if order == 1 else 2)
    weights.flags.writeable = False
    return weights


def _derivatives(image, sigma, axes, wanted):
    """Gaussian derivatives of ``image`` at ``sigma`` along ``axes``: ``{orders: array}`` for each wanted orders.

    ``orders`` is a tuple of derivative orders, one per axis of ``axes``. A
    depth-first tree of 1-D passes: every prefix of orders is filtered once
    and shared by all the derivatives that start with it, and only the
    current branch is held.
    """
    results = {}

    def walk(array, depth, prefix):
        for order in sorted({w[depth] for w in wanted if w[:depth] == prefix}):
            filtered = ndi.correlate1d(array, _kernel(sigma, order), axis=axes[depth], mode=_MODE)
            if depth + 1 == len(axes):
                results[prefix + (order,)] = filtered
            else:
                walk(filtered, depth + 1, prefix + (order,))

    walk(image, 0, ())
    return results


def _unit(n, *axes):
    """Derivative orders (per axis of n) of d_axes: ``_unit(2, 0, 0) == (2, 0)``."""
    orders = [0] * n
    for axis in axes:
        orders[axis] += 1
    return tuple(orders)


def _eigenvalues(tensor, n, targets):
    """Eigenvalues (decreasing) of the symmetric n x n tensor field ``tensor``, written into ``targets``.

    ``tensor[(i, j)]`` (i <= j) are contiguous float32 arrays of one shape;
    ``targets`` are n 1-D arrays (strided views into the output) of their size.
    """
    flat = {key: value.reshape(-1) for key, value in tensor.items()}
    if n == 2:
        # lambda = (a + c) / 2 +- sqrt(((a - c) / 2)^2 + b^2), in float32: two temporaries.
        a, b, c = flat[(0, 0)], flat[(0, 1)], flat[(1, 1)]
        mean = (a + c) * np.float32(0.5)
        radius = np.hypot((a - c) * np.float32(0.5), b)
        np.add(mean, radius, out=targets[0])
        np.subtract(mean, radius, out=targets[1])
        return
    # 3 x 3: the trigonometric closed form (Smith 1961). With q = tr(A) / 3, p = sqrt(tr((A - qI)^2) / 6) and
    # r = det(A - qI) / (2 p^3), the eigenvalues are q + 2 p cos(phi + 2 pi k / 3), phi = arccos(r) / 3. In
    # float64 (the arccos is sensitive near r = +-1), on blocks so the temporaries stay small.
    for start in range(0, flat[(0, 0)].size, _EIGEN_BLOCK):
        block = slice(start, start + _EIGEN_BLOCK)
        a11, a22, a33, a12, a13, a23 = (flat[key][block].astype(np.float64)
                                        for key in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)))
        q = (a11 + a22 + a33) / 3
        d11, d22, d33 = a11 - q, a22 - q, a33 - q
        p = np.sqrt((d11 * d11 + d22 * d22 + d33 * d33 + 2 * (a12 * a12 + a13 * a13 + a23 * a23)) / 6)
        det = d11 * (d22 * d33 - a23 * a23) - a12 * (a12 * d33 - a23 * a13) + a13 * (a12 * a23 - d22 * a13)
        # p = 0: a multiple of the identity, all three eigenvalues are q (r is then irrelevant).
        r = np.divide(det, 2 * p**3, out=np.zeros_like(det), where=p > 0)
        phi = np.arccos(np.clip(r, -1, 1)) / 3
        largest = q + 2 * p * np.cos(phi)
        smallest = q + 2 * p * np.cos(phi + 2 * np.pi / 3)
        targets[0][block] = largest
        targets[1][block] = 3 * q - largest - smallest  # the trace fixes the middle one
        targets[2][block] = smallest


def _checked_image(image, spatial_ndim: int) -> np.ndarray:
    """The image as contiguous float32, or a ValueError naming what is wrong with it."""
    array = np.asarray(image)
    if array.ndim not in (2, 3) or array.ndim < spatial_ndim or array.size == 0:
        wanted = "a (Z, Y, X) volume" if spatial_ndim == 3 else "a (Y, X) image or a (Z, Y, X) stack"
        raise ValueError(f"image must be {wanted} with no empty axis for spatial_ndim={spatial_ndim}, "
                         f"got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise ValueError(f"image must hold real numbers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError("image holds NaN or infinite values (after conversion to float32)")
    return array


def _wanted_derivatives(active: set, n: int) -> set:
    """The derivative orders (one per axis) the ``active`` families need at one scale in ``n`` dimensions."""
    wanted = set()
    if active & {"gaussian", "difference_of_gaussians"}:
        wanted.add((0,) * n)
    if active & {"gradient_magnitude", "structure_tensor"}:
        wanted.update(_unit(n, i) for i in range(n))
    if "laplacian_of_gaussian" in active:
        wanted.update(_unit(n, i, i) for i in range(n))
    if "hessian" in active:
        wanted.update(_unit(n, i, j) for i, j in combinations_with_replacement(range(n), 2))
    return wanted


def ilastik_features(image, sigmas=ILASTIK_SIGMAS, families=FAMILIES, spatial_ndim=2) -> np.ndarray:
    """ilastik's pixel-classification features of an image, float32, features last.

    Parameters
    ----------
    image : array_like of real numbers
        (Y, X), or (Z, Y, X). Used as given (normalise it first if wanted),
        converted to float32.
    sigmas : sequence of float
        Distinct positive scales, in pixels. Default ``ILASTIK_SIGMAS``.
        Any size works, also larger than the image (borders: ``reflect``).
    families : sequence of str, or str
        Feature families, a subset of ``FAMILIES``: ``gaussian``,
        ``laplacian_of_gaussian``, ``gradient_magnitude``,
        ``difference_of_gaussians``, ``structure_tensor``, ``hessian``
        (module docstring). All but ``gaussian`` are computed at the sigmas
        >= ``MIN_DERIVATIVE_SIGMA`` (0.7) only, as in ilastik.
    spatial_ndim : {2, 3}
        2: the features of each (Y, X) plane; a (Z, Y, X) stack is filtered
        slice by slice (no smoothing across Z: anisotropic stacks).
        3: a (Z, Y, X) volume filtered in 3-D, 3 eigenvalues per tensor.

    Returns
    -------
    ndarray of float32
        ``image.shape + (F,)``, F features in the order of
        :func:`feature_names`: families in the order given, sigmas in the
        order given, eigenvalues from the largest to the smallest.

    Raises
    ------
    ValueError
        One message naming the problem: an image that is not 2-D or 3-D
        (or 2-D with ``spatial_ndim=3``), empty, not real numbers, or not
        finite; a sigma that is not positive and finite, or repeated; an
        unknown family; no feature left to compute.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.zeros((32, 32), np.float32); image[12:20, 12:20] = 1
    >>> features = ilastik_features(image)
    >>> features.shape, features.dtype
    ((32, 32, 49), dtype('float32'))
    >>> from scipy.ndimage import gaussian_filter
    >>> bool(np.allclose(features[..., 2], gaussian_filter(image, 1.0)))
    True
    >>> ilastik_features(np.zeros((4, 5, 6)), sigmas=[1.0], families="hessian", spatial_ndim=3).shape
    (4, 5, 6, 3)
    """
    sigmas, families, spatial_ndim = _check_settings(sigmas, families, spatial_ndim)
    array = _checked_image(image, spatial_ndim)

    layout = _layout(sigmas, families, spatial_ndim)
    column = {entry: i for i, entry in enumerate(layout)}
    out = np.empty(array.shape + (len(layout),), dtype=np.float32)
    # (pixels, F): a view of ``out`` whose columns are the 1-D targets of the eigenvalues.
    columns = out.reshape(-1, len(layout))
    axes = tuple(range(array.ndim - spatial_ndim, array.ndim))
    n = spatial_ndim
    pairs = list(combinations_with_replacement(range(n), 2))

    # Scale by scale, so the derivatives of one scale are shared by the families that use them.
    for sigma in sigmas:
        active = {f for f in families if f == "gaussian" or sigma >= MIN_DERIVATIVE_SIGMA}
        d = _derivatives(array, sigma, axes, _wanted_derivatives(active, n))

        if "gaussian" in active:
            out[..., column["gaussian", sigma, None]] = d[(0,) * n]
        if "difference_of_gaussians" in active:
            inner = ndi.gaussian_filter(array, DOG_RATIO * sigma, mode=_MODE, truncate=TRUNCATE, axes=axes)
            np.subtract(d[(0,) * n], inner, out=out[..., column["difference_of_gaussians", sigma, None]])
            del inner
        if "laplacian_of_gaussian" in active:
            target = out[..., column["laplacian_of_gaussian", sigma, None]]
            target[...] = sum(d[_unit(n, i, i)] for i in range(n))
        if "gradient_magnitude" in active:
            target = out[..., column["gradient_magnitude", sigma, None]]
            target[...] = np.sqrt(sum(np.square(d[_unit(n, i)]) for i in range(n)))
        if "structure_tensor" in active:
            tensor = {(i, j): ndi.gaussian_filter(d[_unit(n, i)] * d[_unit(n, j)], STRUCTURE_OUTER_RATIO * sigma,
                                                  mode=_MODE, truncate=TRUNCATE, axes=axes)
                      for i, j in pairs}
            _eigenvalues(tensor, n, [columns[:, column["structure_tensor", sigma, k]] for k in range(n)])
            del tensor
        if "hessian" in active:
            tensor = {(i, j): d[_unit(n, i, j)] for i, j in pairs}
            _eigenvalues(tensor, n, [columns[:, column["hessian", sigma, k]] for k in range(n)])
        del d
    return out
