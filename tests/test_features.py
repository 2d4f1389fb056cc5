"""ilastik's pixel features (napari_coarseseg.features): counts, values on images with known answers, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_coarseseg.features import FAMILIES, ILASTIK_SIGMAS, feature_names, ilastik_features

DERIVATIVE_SIGMAS = tuple(s for s in ILASTIK_SIGMAS if s >= 0.7)


def columns(names, prefix):
    """Indices of the features whose name starts with ``prefix``."""
    return [i for i, name in enumerate(names) if name.startswith(prefix)]


def quadratic(shape, coefficients):
    """sum_i c_i * (x_i - centre_i)^2 on a grid, float32, and the centre pixel."""
    centre = tuple(n // 2 for n in shape)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) - c for n, c in zip(shape, centre, strict=True)],
                        indexing="ij")
    return sum(c * g**2 for c, g in zip(coefficients, grids, strict=True)).astype(np.float32), centre


def test_counts_match_the_names_in_2d_and_3d():
    rng = np.random.default_rng(0)
    image = rng.random((16, 20)).astype(np.float32)
    names = feature_names()
    assert len(names) == 7 + 6 * (1 + 1 + 1 + 2 + 2) == 49
    assert len(set(names)) == 49
    assert ilastik_features(image).shape == (16, 20, 49)
    # A stack, slice by slice: the 2-D features per slice.
    assert ilastik_features(rng.random((3, 10, 12))).shape == (3, 10, 12, 49)
    # A volume in 3-D: three eigenvalues per tensor.
    names_3d = feature_names(spatial_ndim=3)
    assert len(names_3d) == 7 + 6 * (1 + 1 + 1 + 3 + 3) == 61
    assert ilastik_features(rng.random((6, 8, 10)), spatial_ndim=3).shape == (6, 8, 10, 61)
    assert "hessian eig2 s=3.5" in names_3d and "hessian eig2 s=3.5" not in names
    # Sigma 0.3 is a Gaussian feature only, as in ilastik.
    assert [n for n in names if n.endswith("s=0.3")] == ["gaussian s=0.3"]
    assert names[:2] == ["gaussian s=0.3", "gaussian s=0.7"] and names[-1] == "hessian eig1 s=10.0"


def test_names_follow_the_order_given():
    assert feature_names(sigmas=(1.6, 0.3), families=("hessian", "gaussian")) == [
        "hessian eig0 s=1.6", "hessian eig1 s=1.6", "gaussian s=1.6", "gaussian s=0.3"]


def test_a_subset_equals_its_columns_of_the_full_set():
    image = np.random.default_rng(1).random((24, 28)).astype(np.float32)
    full, names = ilastik_features(image), feature_names()
    for family in FAMILIES:
        part = ilastik_features(image, families=(family,))
        np.testing.assert_array_equal(part, full[..., columns(names, family)])


def test_gaussian_is_scipy_gaussian_filter():
    image = np.random.default_rng(2).normal(size=(40, 36)).astype(np.float32)
    features = ilastik_features(image, families="gaussian")
    for k, sigma in enumerate(ILASTIK_SIGMAS):
        np.testing.assert_allclose(features[..., k], ndi.gaussian_filter(image, sigma), rtol=0, atol=1e-6)
    # Integers are converted to float32 first, not filtered as integers.
    ramp = np.arange(40 * 36).reshape(40, 36) % 7
    np.testing.assert_allclose(ilastik_features(ramp, sigmas=[1.0], families="gaussian")[..., 0],
                               ndi.gaussian_filter(ramp.astype(np.float32), 1.0), atol=1e-5)


def test_derivative_features_are_scipys_up_to_the_kernel_correction():
    # Same filters as scipy.ndimage, with vigra's exact derivative kernels: close, not equal.
    image = np.random.default_rng(3).normal(size=(48, 40)).astype(np.float32)
    names = feature_names(sigmas=[1.6])
    features = ilastik_features(image, sigmas=[1.6])
    for name, reference in [
        ("laplacian_of_gaussian", ndi.gaussian_laplace(image, 1.6)),
        ("gradient_magnitude", ndi.gaussian_gradient_magnitude(image, 1.6)),
        ("difference_of_gaussians", ndi.gaussian_filter(image, 1.6) - ndi.gaussian_filter(image, 0.66 * 1.6)),
    ]:
        got = features[..., names.index(f"{name} s=1.6")]
        assert np.abs(got - reference).max() < 0.01 * np.abs(reference).max(), name


@pytest.mark.parametrize("sigma", DERIVATIVE_SIGMAS)
def test_hessian_of_a_quadratic_is_2a_and_2b_at_every_sigma(sigma):
    # I = a x^2 + b y^2: Hessian diag(2b, 2a) (Y, X) everywhere the kernel does not reach the border.
    a, b = 0.01, 0.03
    image, centre = quadratic((96, 96), (b, a))
    names = feature_names(sigmas=[sigma])
    features = ilastik_features(image, sigmas=[sigma])[centre]
    eig0, eig1 = features[names.index(f"hessian eig0 s={sigma}")], features[names.index(f"hessian eig1 s={sigma}")]
    np.testing.assert_allclose([eig0, eig1], [2 * b, 2 * a], rtol=2e-3)  # decreasing: eig0 >= eig1
    np.testing.assert_allclose(features[names.index(f"laplacian_of_gaussian s={sigma}")], 2 * (a + b), rtol=2e-3)
    # The gradient vanishes at the apex.
    assert abs(features[names.index(f"gradient_magnitude s={sigma}")]) < 1e-4


def test_hessian_of_a_quadratic_in_3d():
    a, b, c = 0.02, 0.05, 0.01
    image, centre = quadratic((32, 32, 32), (a, b, c))
    names = feature_names(sigmas=[1.0, 3.5], families="hessian", spatial_ndim=3)
    features = ilastik_features(image, sigmas=[1.0, 3.5], families="hessian", spatial_ndim=3)[centre]
    assert names[:3] == ["hessian eig0 s=1.0", "hessian eig1 s=1.0", "hessian eig2 s=1.0"]
    np.testing.assert_allclose(features, [2 * b, 2 * a, 2 * c] * 2, rtol=2e-3)


@pytest.mark.parametrize("sigma", (0.7, 1.6, 5.0))
def test_a_ramp_has_one_gradient_direction(sigma):
    # I = c * x: gradient (0, c), structure tensor [[0, 0], [0, c^2]], Hessian 0, away from the border.
    c = 0.5
    image = np.tile(c * np.arange(64, dtype=np.float32), (64, 1))
    names = feature_names(sigmas=[sigma])
    features = ilastik_features(image, sigmas=[sigma])[32, 32]

    def value(name):
        return features[names.index(f"{name} s={sigma}")]

    np.testing.assert_allclose(value("gradient_magnitude"), c, rtol=1e-4)
    np.testing.assert_allclose(value("structure_tensor eig0"), c * c, rtol=1e-4)
    np.testing.assert_allclose([value("structure_tensor eig1"), value("hessian eig0"), value("hessian eig1"),
                                value("laplacian_of_gaussian")], 0, atol=1e-5)
    # The difference of Gaussians of a linear function is 0 too (both smoothings keep it).
    assert abs(value("difference_of_gaussians")) < 1e-4


def test_eigenvalues_match_numpy_on_a_random_volume():
    # Both tensors, checked against an independent computation with numpy's eigvalsh (scipy's kernels).
    volume = np.random.default_rng(4).normal(size=(10, 14, 12))
    sigma = 1.6
    names = feature_names(sigmas=[sigma], spatial_ndim=3)
    features = ilastik_features(volume, sigmas=[sigma], spatial_ndim=3)

    def unit(*axes):
        return [sum(axis == i for i in axes) for axis in range(3)]

    hessian = np.empty(volume.shape + (3, 3))
    for i in range(3):
        for j in range(3):
            hessian[..., i, j] = ndi.gaussian_filter(volume, sigma, order=unit(i, j))
    gradient = [ndi.gaussian_filter(volume, sigma, order=unit(i)) for i in range(3)]
    structure = np.empty(volume.shape + (3, 3))
    for i in range(3):
        for j in range(3):
            structure[..., i, j] = ndi.gaussian_filter(gradient[i] * gradient[j], 0.5 * sigma)
    for family, tensor in [("hessian", hessian), ("structure_tensor", structure)]:
        expected = np.linalg.eigvalsh(tensor)[..., ::-1]  # decreasing
        got = features[..., columns(names, family)]
        assert np.all(np.diff(got, axis=-1) <= 1e-6), family
        np.testing.assert_allclose(got, expected, rtol=0, atol=0.01 * np.abs(expected).max(), err_msg=family)


def test_constant_image_has_no_structure():
    value = 3.7
    image = np.full((40, 40), value, dtype=np.float32)
    names = feature_names()
    features = ilastik_features(image)
    gaussian = columns(names, "gaussian")
    np.testing.assert_allclose(features[..., gaussian], value, rtol=1e-6)
    rest = [i for i in range(len(names)) if i not in gaussian]
    assert len(rest) == 42
    # Exactly zero kernels sums: scipy's own LoG of this image is -0.037 at sigma 0.7.
    assert np.abs(features[..., rest]).max() < 1e-5 * value


def test_bright_disc_has_a_negative_laplacian_at_its_centre():
    radius = 6
    yy, xx = np.mgrid[:48, :48]
    image = ((yy - 24) ** 2 + (xx - 24) ** 2 <= radius**2).astype(np.float32)
    names = feature_names()
    centre = ilastik_features(image)[24, 24]
    for sigma in (3.5, 5.0):  # near radius / sqrt(2), the scale at which LoG responds most to a disc
        assert centre[names.index(f"laplacian_of_gaussian s={sigma}")] < -0.01
        assert centre[names.index(f"difference_of_gaussians s={sigma}")] < -0.01
        # A bright blob: both Hessian eigenvalues negative (curving down in every direction).
        assert centre[names.index(f"hessian eig0 s={sigma}")] < 0
    # Outside the rim the Laplacian turns positive (the dark side of the edge).
    assert ilastik_features(image, sigmas=[3.5], families="laplacian_of_gaussian")[24, 24 + radius + 3, 0] > 0


def test_a_stack_is_filtered_slice_by_slice():
    rng = np.random.default_rng(5)
    stack = rng.random((3, 20, 18)).astype(np.float32)
    features = ilastik_features(stack, sigmas=(0.3, 1.0, 3.5))
    for z in range(3):
        np.testing.assert_allclose(features[z], ilastik_features(stack[z], sigmas=(0.3, 1.0, 3.5)),
                                   rtol=1e-5, atol=1e-6)


def test_sigmas_larger_than_the_image():
    image = np.random.default_rng(6).random((6, 7)).astype(np.float32)
    features = ilastik_features(image, sigmas=(10.0, 50.0))
    assert features.shape == (6, 7, 2 + 2 * 7) and np.isfinite(features).all()
    # Mirrored borders: at sigma 50 the smoothed image is nearly flat, at the image's mean.
    np.testing.assert_allclose(features[..., 1], image.mean(), atol=0.02)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image=np.zeros(10)), r"image must be .* got shape \(10,\)"),
    (dict(image=np.zeros((2, 3, 4, 5))), r"got shape \(2, 3, 4, 5\)"),
    (dict(image=np.zeros((8, 8)), spatial_ndim=3), r"spatial_ndim=3, got shape \(8, 8\)"),
    (dict(image=np.zeros((0, 8))), r"no empty axis"),
    (dict(image=np.zeros((8, 8)), spatial_ndim=4), r"spatial_ndim must be 2 or 3, got 4"),
    (dict(image=np.zeros((8, 8)), sigmas=(1.0, -2.0)), r"sigmas must be positive finite numbers, got \(1.0, -2.0\)"),
    (dict(image=np.zeros((8, 8)), sigmas=(1.0, 1.0)), r"sigmas must be distinct"),
    (dict(image=np.zeros((8, 8)), sigmas=()), r"sigmas must be positive"),
    (dict(image=np.zeros((8, 8)), families=("gaussian", "sobel")), r"unknown feature family 'sobel'"),
    (dict(image=np.zeros((8, 8)), sigmas=[0.3], families="hessian"), r"no features.*>= 0.7"),
    (dict(image=np.full((8, 8), np.nan)), r"NaN or infinite"),
    (dict(image=np.zeros((8, 8), complex)), r"real numbers, got dtype complex128"),
])
def test_bad_input_is_refused_with_a_message_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ilastik_features(**kwargs)


def test_feature_names_checks_its_settings_too():
    with pytest.raises(ValueError, match="unknown feature family 'edges'"):
        feature_names(families=["edges"])
    with pytest.raises(ValueError, match="sigmas must be positive"):
        feature_names(sigmas=[0.0])
