"""Post-processing of label images: keep each class's largest connected component.

For anatomy, where each structure is one connected organ, a prediction's
stray islands are errors. With ``C_k^1 .. C_k^n`` the connected components
of class ``k`` (face-connected in 2-D, or in 3-D for a volume),

    labels'(i) = k  if i in argmax_j |C_k^j|,  0 (background) where class k loses an island,

the rule WSL4MIS and the scribble papers apply to cardiac MRI before
scoring. It suits one object per class only: for cells or nuclei (many
objects of one class) it would delete all but one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["largest_component_per_class"]


def largest_component_per_class(labels: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of each class 1..K; the other islands become background (0).

    Parameters
    ----------
    labels : ndarray of int
        A label image (2-D) or volume (3-D): 0 background, 1..K classes.
        Components are face-connected over all of its axes.

    Returns
    -------
    ndarray
        A new array of the same shape and dtype; ``labels`` is not changed.

    Examples
    --------
    >>> labels = np.array([[1, 1, 0, 1],
    ...                    [0, 0, 0, 0],
    ...                    [2, 0, 2, 2]], dtype=np.uint8)
    >>> largest_component_per_class(labels)
    array([[1, 1, 0, 0],
           [0, 0, 0, 0],
           [0, 0, 2, 2]], dtype=uint8)
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (0 background, 1..K classes), got {labels.dtype}")
    kept = np.zeros_like(labels)
    for k in np.unique(labels[labels > 0]):  # a loop over classes (a handful), not pixels
        components, n = ndimage.label(labels == k)  # n >= 1: k occurs in labels
        # Component sizes by one bincount; index 0 is the outside of class k.
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        sizes[0] = 0
        kept[components == int(np.argmax(sizes))] = k
    return kept
