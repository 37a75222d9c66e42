"""Synthetic EM domains: neuropil-like images with exact instance labels, and families of
domains related by a known tree.

A domain is a :class:`DomainStyle` (a flat set of physical and imaging parameters).
:func:`make_domain` renders one volume of it:

1. **Neurites** are the cells of an additively weighted Voronoi diagram (discs of varied
   radius, so cell sizes vary) whose seeds move smoothly with z, seen through a smooth
   random displacement field (also smooth in z). The same seed is the same neurite in
   every slice, so the labels are 3-D instances.
2. **Membranes** are drawn on the label boundaries with a given thickness and darkness
   (smooth profile); **extracellular space** widens some boundaries into light gaps.
3. **Cytoplasm** has a per-neurite brightness and a fine random texture; **mitochondria**
   are dark elongated ellipses with transverse cristae that persist over several slices;
   **vesicles** are small dark rings packed into some neurites (boutons).
4. **Imaging chain**: Gaussian blur, contrast, brightness, a smooth brightness gradient,
   gamma, Poisson (shot) noise at a given photon count plus Gaussian read noise, uint8.
5. Optional **artefacts** at given per-slice rates, each reported with a mask: folds,
   stains, defocus, brightness jumps, missing sections.

Labels are uint32: 0 on membranes and extracellular space (the convention of the real
sets), consecutive neurite ids elsewhere (mitochondria and vesicles belong to their neurite).

:func:`domain_family` draws ``n`` styles at the leaves of a random binary tree: every
parameter, in an unbounded (logit/log) coordinate, diffuses along the branches by
Brownian motion, so the expected squared parameter distance between two leaves is
proportional to their path length in the tree (an additive tree metric), and the tree
is returned in Newick form.

Everything is float32, separable filters and Euclidean distance transforms (no FFT), and
one ``numpy.random.Generator`` (PCG64) stream per purpose: the same seed gives the same
bytes on every run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputValueError, ShapeError, require

__all__ = ["DomainStyle", "make_domain", "apply_artefact", "domain_family", "ARTEFACT_KINDS", "PARAMETER_BOUNDS",
           "MORPHOLOGY_TRAITS", "FAMILY_TREES", "FAMILY_TRAITS"]

_MIN_PIECE_PX = 12  # 2-D pieces of a neurite smaller than this become boundary (label 0)

ARTEFACT_KINDS = ("fold", "stain", "defocus", "brightness_jump", "missing_section")

# (low, high, scale): "lin" -> logit((v-lo)/(hi-lo)); "log" -> logit of log-position. These
# bounds keep every drifted style physically plausible.
PARAMETER_BOUNDS: dict[str, tuple[float, float, str]] = {
    "cell_diameter_px": (12.0, 120.0, "log"),
    "size_variability": (0.0, 0.95, "lin"),
    "warp_amplitude_px": (0.0, 30.0, "lin"),
    "warp_scale_px": (16.0, 256.0, "log"),
    "z_drift_px": (0.0, 6.0, "lin"),
    "membrane_thickness_px": (1.0, 8.0, "log"),
    "membrane_darkness": (0.1, 0.95, "lin"),
    "ecs_fraction": (0.0, 0.7, "lin"),
    "ecs_width_px": (1.0, 8.0, "log"),
    "cytoplasm_intensity": (0.3, 0.9, "lin"),
    "cell_contrast": (0.0, 0.25, "lin"),
    "texture_amplitude": (0.0, 0.2, "lin"),
    "texture_scale_px": (0.6, 8.0, "log"),
    "mito_fraction": (0.0, 0.6, "lin"),
    "mito_size_px": (4.0, 40.0, "log"),
    "mito_darkness": (0.05, 0.7, "lin"),
    "vesicle_fraction": (0.0, 0.6, "lin"),
    "vesicle_radius_px": (1.5, 10.0, "log"),
    "vesicle_density": (0.001, 0.05, "log"),
    "blur_sigma_px": (0.0, 3.0, "lin"),
    "photons": (4.0, 1000.0, "log"),
    "read_noise": (0.0, 0.15, "lin"),
    "contrast": (0.4, 1.6, "lin"),
    "gamma": (0.5, 2.0, "log"),
    "brightness": (-0.25, 0.25, "lin"),
    "gradient": (0.0, 0.4, "lin"),
}

@dataclass(frozen=True)
class DomainStyle:
    """Parameters of one synthetic EM domain (lengths in pixels of the xy grid).

    The defaults look like a chemically fixed ssTEM neuropil at ~4-5 nm/px, 40-50 nm
    sections. :data:`PARAMETER_BOUNDS` gives the range of each field; ``invert`` flips
    the contrast (backscattered SEM) and ``name`` labels the style.

    Examples
    --------
    >>> s = DomainStyle(name="thick-membranes", membrane_thickness_px=5.0)
    >>> s.replace(photons=20.0).photons
    20.0
    """

    name: str = "default"
    cell_diameter_px: float = 55.0
    size_variability: float = 0.7
    warp_amplitude_px: float = 9.0
    warp_scale_px: float = 56.0
    z_drift_px: float = 1.5
    membrane_thickness_px: float = 2.5
    membrane_darkness: float = 0.7
    ecs_fraction: float = 0.1
    ecs_width_px: float = 2.0
    cytoplasm_intensity: float = 0.62
    cell_contrast: float = 0.06
    texture_amplitude: float = 0.05
    texture_scale_px: float = 1.2
    mito_fraction: float = 0.2
    mito_size_px: float = 24.0
    mito_darkness: float = 0.3
    vesicle_fraction: float = 0.15
    vesicle_radius_px: float = 4.0
    vesicle_density: float = 0.02
    blur_sigma_px: float = 0.6
    photons: float = 120.0
    read_noise: float = 0.025
    contrast: float = 1.0
    gamma: float = 1.0
    brightness: float = 0.0
    gradient: float = 0.1
    invert: bool = False

    def __post_init__(self):
        for k, (lo, hi, _) in PARAMETER_BOUNDS.items():
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi):
                raise InputValueError(f"DomainStyle.{k}: expected a value in [{lo}, {hi}], got {v!r}")

    def replace(self, **changes) -> "DomainStyle":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DomainStyle":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputValueError(f"DomainStyle: unknown fields {sorted(unknown)}")
        return cls(**d)

    def to_vector(self) -> np.ndarray:
        """The unbounded parameter coordinates (float64, one per :data:`PARAMETER_BOUNDS` key)
        in which :func:`domain_family` drifts styles."""
        out = []
        for k, (lo, hi, sc) in PARAMETER_BOUNDS.items():
            v = float(getattr(self, k))
            p = (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)) if sc == "log" else (v - lo) / (hi - lo)
            p = min(max(p, 1e-4), 1 - 1e-4)
            out.append(math.log(p / (1 - p)))
        return np.array(out)

    @classmethod
    def from_vector(cls, u, *, name: str = "default", invert: bool = False) -> "DomainStyle":
        """Inverse of :meth:`to_vector` (values are mapped into their bounds)."""
        u = np.asarray(u, dtype=np.float64)
        if u.shape != (len(PARAMETER_BOUNDS),):
            raise ShapeError(f"expected a parameter vector of length {len(PARAMETER_BOUNDS)}, got shape {u.shape}")
        kw = {}
        for x, (k, (lo, hi, sc)) in zip(u, PARAMETER_BOUNDS.items()):
            p = 1.0 / (1.0 + math.exp(-float(np.clip(x, -30, 30))))
            v = math.exp(math.log(lo) + p * (math.log(hi) - math.log(lo))) if sc == "log" else lo + p * (hi - lo)
            kw[k] = float(min(max(v, lo), hi))
        return cls(name=name, invert=invert, **kw)


# ----------------------------------------------------------------------------- helpers
def _smooth_noise_2d(rng, shape, sigma, *, out_std=1.0) -> np.ndarray:
    """White noise low-passed by a Gaussian of ``sigma`` px, rescaled to ``out_std``."""
    from scipy import ndimage

    w = rng.standard_normal(shape, dtype=np.float32)
    if sigma <= 0.3:
        return w * np.float32(out_std)
    f = ndimage.gaussian_filter(w, sigma, mode="wrap", truncate=3.0)
    # std of 2-D Gaussian-filtered unit white noise is 1 / (2 sqrt(pi) sigma)
    f *= np.float32(out_std * 2.0 * math.sqrt(math.pi) * sigma)
    return f


def _coarse_field(rng, zyx_shape, scale, z_scale, n_comp) -> np.ndarray:
    """Smooth random fields on a coarse grid (n_comp, Zc, Hc, Wc), unit std, node spacing
    ``scale`` px in xy and ``z_scale`` slices in z."""
    from scipy import ndimage

    z, h, w = zyx_shape
    zc = int(math.ceil(z / z_scale)) + 4
    hc = int(math.ceil(h / scale)) + 4
    wc = int(math.ceil(w / scale)) + 4
    f = rng.standard_normal((n_comp, zc, hc, wc)).astype(np.float32)
    f = ndimage.gaussian_filter(f, (0, 0.8, 0.8, 0.8), mode="nearest")
    f /= np.float32(max(float(f.std()), 1e-6))
    return f


def _cubic_matrix(n_out: int, n_in: int, scale: float) -> np.ndarray:
    """(n_out, n_in) Catmull-Rom interpolation weights sampling a coarse grid (node spacing
    ``scale`` px, offset 2 nodes) at every output pixel."""
    x = np.arange(n_out, dtype=np.float64) / scale + 2.0
    i0 = np.floor(x).astype(np.int64)
    t = x - i0
    w = np.stack([((-t + 2) * t - 1) * t / 2, ((3 * t - 5) * t * t + 2) / 2,
                  ((-3 * t + 4) * t + 1) * t / 2, (t - 1) * t * t / 2], 1)
    m = np.zeros((n_out, n_in))
    for k in range(4):
        np.add.at(m, (np.arange(n_out), np.clip(i0 - 1 + k, 0, n_in - 1)), w[:, k])
    return m


def _sample_coarse(field, z, h, w, scale, z_scale) -> np.ndarray:
    """Interpolate a coarse field at slice ``z`` onto an (h, w) grid: Catmull-Rom in xy as two
    small matrix products (far cheaper than map_coordinates), linear in z. The result is
    rounded to 1/4096 so that last-bit differences between BLAS builds cannot change it."""
    zf = z / z_scale + 2.0
    z0 = int(math.floor(zf))
    t = zf - z0
    sl = (1 - t) * field[:, z0].astype(np.float64) + t * field[:, z0 + 1].astype(np.float64)
    my = _cubic_matrix(h, sl.shape[1], scale)
    mx = _cubic_matrix(w, sl.shape[2], scale)
    out = np.einsum("yi,cij,xj->cyx", my, sl, mx, optimize=True)
    return (np.rint(out * 4096.0) / 4096.0).astype(np.float32)


def _stamp_max(canvas, patch, y0, x0):
    """canvas[y0:, x0:] = max(canvas, patch) with clipping at the borders."""
    h, w = patch.shape
    H, W = canvas.shape
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + h, H), min(x0 + w, W)
    if ya >= yb or xa >= xb:
        return
    sub = canvas[ya:yb, xa:xb]
    np.maximum(sub, patch[ya - y0:yb - y0, xa - x0:xb - x0], out=sub)


def _ring_kernel(r: float) -> np.ndarray:
    k = int(math.ceil(r + 2))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1].astype(np.float32)
    d = np.sqrt(yy * yy + xx * xx)
    wall = max(0.8, r * 0.3)
    ring = np.exp(-((d - r) / wall) ** 2)
    lumen = 0.25 * (d < r - wall)
    return np.maximum(ring, lumen).astype(np.float32)


# ----------------------------------------------------------------------------- generator
def make_domain(style: DomainStyle | None, shape, *, seed, artefacts: dict | None = None):
    """Render a synthetic EM image/volume with exact instance labels.

    Parameters
    ----------
    style : DomainStyle or None
        The domain's parameters (``None``: the default style).
    shape : tuple of int
        ``(h, w)`` for a 2-D image or ``(z, h, w)`` for an anisotropic stack.
    seed : int
        Everything (geometry, noise, artefacts) follows from it: the same seed gives the
        same bytes; the clean image does not depend on ``artefacts``.
    artefacts : dict, optional
        ``{kind: rate}`` with kinds from :data:`ARTEFACT_KINDS`; each slice (or the 2-D
        image) gets each kind independently with probability ``rate``.

    Returns
    -------
    image : numpy.ndarray
        uint8, ``shape``.
    labels : numpy.ndarray
        uint32, ``shape``; 0 on membranes and extracellular space, consecutive neurite ids
        (the same id across z for the same neurite) elsewhere.
    masks : dict of str to numpy.ndarray
        Only when ``artefacts`` is given: a bool mask of ``shape`` per requested kind.

    Examples
    --------
    >>> img, lab = make_domain(DomainStyle(), (64, 64), seed=0)
    >>> img.dtype, lab.dtype, img.shape
    (dtype('uint8'), dtype('uint32'), (64, 64))
    """
    from scipy import ndimage

    cc3d = require("cc3d", "io")
    style = DomainStyle() if style is None else style
    if not isinstance(style, DomainStyle):
        raise InputValueError(f"expected a DomainStyle, got {type(style).__name__}")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ShapeError(f"expected a 2-D (h, w) or 3-D (z, h, w) shape of positive sizes, got {shape}")
    if artefacts is not None:
        bad = set(artefacts) - set(ARTEFACT_KINDS)
        if bad:
            raise InputValueError(f"expected artefact kinds from {ARTEFACT_KINDS}, got {sorted(bad)}")
        for k, r in artefacts.items():
            if not 0.0 <= float(r) <= 1.0:
                raise InputValueError(f"artefact rate for {k!r}: expected a value in [0, 1], got {r}")
    is2d = len(shape) == 2
    Z, H, W = (1, *shape) if is2d else shape
    s = style
    ss = np.random.SeedSequence(int(seed))
    rng_geo, rng_org, rng_img, rng_art = (np.random.default_rng(c) for c in ss.spawn(4))

    # --- seeds on a jittered grid (neuropil packs neurites densely), with per-seed radius
    margin = int(math.ceil(3 * s.warp_amplitude_px + s.z_drift_px * Z * 0.6 + s.cell_diameter_px)) + 2
    CH, CW = H + 2 * margin, W + 2 * margin
    # A dense jittered grid thinned with a log-normal, spatially smooth keep-probability:
    # mean cell area ~ cell_diameter_px**2, sizes heterogeneous like axons beside dendrites.
    spacing = s.cell_diameter_px * 0.6
    gy, gx = np.meshgrid(np.arange(spacing / 2, CH, spacing), np.arange(spacing / 2, CW, spacing), indexing="ij")
    p0 = np.stack([gy.ravel(), gx.ravel()], 1) + rng_geo.uniform(-0.45, 0.45, (gy.size, 2)) * spacing
    K = 16  # random Fourier features: a smooth unit-variance field at the scale of ~2 cells
    om = rng_geo.normal(0, 1.0 / (2.0 * s.cell_diameter_px), (K, 2))
    ph = rng_geo.uniform(0, 2 * np.pi, K)
    g = np.sqrt(2.0 / K) * np.cos(p0 @ om.T + ph).sum(1)
    sv = 1.5 * s.size_variability
    keep_p = np.clip(0.36 * np.exp(sv * g - sv * sv / 2), 0.03, 1.0)
    p0 = p0[rng_geo.random(p0.shape[0]) < keep_p]
    n_seeds = p0.shape[0]
    radius = s.cell_diameter_px * 0.5 * s.size_variability * rng_geo.beta(1.2, 2.0, n_seeds)
    vel = rng_geo.normal(0.0, s.z_drift_px, (n_seeds, 2))
    wob_amp = rng_geo.uniform(0, 1, (n_seeds, 2)) * s.z_drift_px * 2.0
    wob_freq = rng_geo.uniform(0.05, 0.3, (n_seeds, 1))
    wob_phase = rng_geo.uniform(0, 2 * np.pi, (n_seeds, 2))
    cell_offset = rng_geo.normal(0.0, s.cell_contrast, n_seeds + 1).astype(np.float32)
    cell_offset[0] = 0
    texture_gain = rng_geo.uniform(0.5, 1.5, n_seeds + 1).astype(np.float32)
    order = np.argsort(-radius, kind="stable")  # big discs first so small seeds stay visible

    # displacement field (2 comps), ECS field (1) and gradient direction
    warp_field = _coarse_field(rng_geo, (Z, H, W), s.warp_scale_px, 6.0, 3)
    # a finer octave bends the straight Voronoi edges into curved membranes
    fine_scale = max(8.0, s.warp_scale_px / 3.0)
    warp_fine = _coarse_field(rng_geo, (Z, H, W), fine_scale, 4.0, 2)
    grad_angle = rng_img.uniform(0, 2 * np.pi)
    grad_drift = rng_img.normal(0, 0.02)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ramp = (np.cos(grad_angle) * (yy / max(H - 1, 1) - 0.5) + np.sin(grad_angle) * (xx / max(W - 1, 1) - 0.5))

    # --- mitochondria: attached to a seed, an offset, an ellipse, a z-extent
    has_mito = rng_org.random(n_seeds) < s.mito_fraction
    mito_seeds = np.flatnonzero(has_mito)
    n_m = mito_seeds.size
    m_off = rng_org.uniform(-0.25, 0.25, (n_m, 2)) * spacing
    m_b = s.mito_size_px / 2 * rng_org.uniform(0.8, 1.2, n_m)
    m_a = m_b * rng_org.uniform(1.2, 3.0, n_m)
    m_theta = rng_org.uniform(0, np.pi, n_m)
    m_z0 = rng_org.uniform(-8, Z, n_m)
    m_len = rng_org.uniform(3, 16, n_m)
    m_period = rng_org.uniform(2.5, 4.0, n_m)
    is_bouton = rng_org.random(n_seeds + 1) < s.vesicle_fraction
    is_bouton[0] = False
    ring = _ring_kernel(s.vesicle_radius_px)
    rk = ring.shape[0] // 2

    image = np.empty((Z, H, W), np.float32)
    labels = np.empty((Z, H, W), np.uint32)
    half_t = s.membrane_thickness_px / 2.0
    ecs_level = None
    for z in range(Z):
        t = float(z)
        pos = p0 + vel * t + wob_amp * np.sin(wob_freq * t + wob_phase)
        # Voronoi canvas: discs of each seed, nearest disc by EDT (additively weighted Voronoi)
        canvas = np.zeros((CH, CW), np.int32)
        iy = np.rint(pos[:, 0]).astype(np.int64)
        ix = np.rint(pos[:, 1]).astype(np.int64)
        for i in order:
            r = radius[i]
            if r >= 1.0:
                k = int(r)
                dy, dx = np.mgrid[-k:k + 1, -k:k + 1]
                disk = (dy * dy + dx * dx) <= r * r
                y0, x0 = iy[i] - k, ix[i] - k
                ya, xa, yb, xb = max(y0, 0), max(x0, 0), min(y0 + 2 * k + 1, CH), min(x0 + 2 * k + 1, CW)
                if ya < yb and xa < xb:
                    sub = canvas[ya:yb, xa:xb]
                    sub[disk[ya - y0:yb - y0, xa - x0:xb - x0]] = i + 1
            elif 0 <= iy[i] < CH and 0 <= ix[i] < CW:
                canvas[iy[i], ix[i]] = i + 1
        if not canvas.any():
            canvas[CH // 2, CW // 2] = 1
        idx = ndimage.distance_transform_edt(canvas == 0, return_distances=False, return_indices=True)
        vor = canvas[idx[0], idx[1]]
        # mitochondria field in canvas space (warped with the cells)
        mito = np.zeros((CH, CW), np.float32)
        for j in range(n_m):
            if not (m_z0[j] <= t < m_z0[j] + m_len[j]):
                continue
            # taper the ends in z so a mitochondrion starts and ends small
            zrel = (t - m_z0[j]) / m_len[j]
            taper = math.sqrt(max(0.0, 1 - (2 * zrel - 1) ** 2)) * 0.6 + 0.4
            a, b = m_a[j] * taper, m_b[j] * taper
            c = pos[mito_seeds[j]] + m_off[j]
            k = int(math.ceil(a)) + 2
            cy, cx = int(round(c[0])), int(round(c[1]))
            dy, dx = np.mgrid[-k:k + 1, -k:k + 1].astype(np.float32)
            dy -= np.float32(c[0] - cy)
            dx -= np.float32(c[1] - cx)
            ct, st = math.cos(m_theta[j]), math.sin(m_theta[j])
            u = dx * ct + dy * st
            v = -dx * st + dy * ct
            rr = (u / a) ** 2 + (v / b) ** 2
            inside = rr <= 1.0
            # matrix, dark transverse cristae, a dark double outer membrane
            cristae = 0.55 + 0.45 * np.clip((np.cos(2 * np.pi * u / m_period[j]) - 0.5) / 0.5, 0, 1)
            rim = np.clip((rr - 0.72) / 0.15, 0, 1)
            patch = np.where(inside, np.maximum(cristae, rim), 0).astype(np.float32)
            _stamp_max(mito, patch, cy - k, cx - k)
        # warp: output pixel p looks up the canvas at p + margin + displacement
        fld = _sample_coarse(warp_field, t, H, W, s.warp_scale_px, 6.0)
        fine = _sample_coarse(warp_fine, t, H, W, fine_scale, 4.0)
        qy = yy + margin + fld[0] * np.float32(s.warp_amplitude_px) + fine[0] * np.float32(0.35 * s.warp_amplitude_px)
        qx = xx + margin + fld[1] * np.float32(s.warp_amplitude_px) + fine[1] * np.float32(0.35 * s.warp_amplitude_px)
        iqy = np.clip(np.rint(qy).astype(np.int64), 0, CH - 1)
        iqx = np.clip(np.rint(qx).astype(np.int64), 0, CW - 1)
        lab = vor[iqy, iqx].astype(np.int64)
        if mito.any():
            mit = ndimage.map_coordinates(mito, [qy, qx], order=1, mode="constant", cval=0.0)
        else:
            mit = np.zeros((H, W), np.float32)
        # membranes: distance to the nearest label change, in output pixels
        bnd = np.zeros((H, W), bool)
        bnd[:-1, :] |= lab[:-1, :] != lab[1:, :]
        bnd[:, :-1] |= lab[:, :-1] != lab[:, 1:]
        if bnd.any():
            dist = ndimage.distance_transform_edt(~bnd).astype(np.float32)
        else:
            dist = np.full((H, W), 1e3, np.float32)
        if ecs_level is None:
            ecs_level = float(np.quantile(fld[2], 1 - s.ecs_fraction)) if s.ecs_fraction > 0 else np.inf
        ecs = (fld[2] > ecs_level) & (dist < half_t + s.ecs_width_px) if s.ecs_fraction > 0 else np.zeros((H, W), bool)
        # junctions of three or more neurites open into small rounded gaps (rounded corners)
        l00, l01, l10, l11 = lab[:-1, :-1], lab[:-1, 1:], lab[1:, :-1], lab[1:, 1:]
        n_dist = 1 + (l01 != l00) + ((l10 != l00) & (l10 != l01)) + ((l11 != l00) & (l11 != l01) & (l11 != l10))
        junc = np.zeros((H, W), bool)
        junc[:-1, :-1] = n_dist >= 3
        if junc.any():
            dj = ndimage.distance_transform_edt(~junc).astype(np.float32)
            ecs |= dj < (half_t + s.ecs_width_px * np.clip(0.8 + 0.5 * fld[2], 0.2, 2.0))
        memb = dist < max(half_t, 0.5)
        lab_out = np.where(memb | ecs, 0, lab).astype(np.uint32)
        # slivers cut off by membranes/gaps are not learnable instances: make them boundary
        pieces = cc3d.connected_components(lab_out, connectivity=4)
        sizes = np.bincount(pieces.ravel())
        tiny = sizes < _MIN_PIECE_PX
        tiny[0] = False
        if tiny.any():
            lab_out[tiny[pieces]] = 0
        labels[z] = lab_out

        # --- intensity
        I = np.float32(s.cytoplasm_intensity) + cell_offset[lab]
        tex = _smooth_noise_2d(rng_img, (H, W), s.texture_scale_px, out_std=s.texture_amplitude)
        # granules (ribosomes, microtubule cross-sections): sparse dark dots
        dots = ndimage.gaussian_filter((rng_img.random((H, W), dtype=np.float32) < 0.012).astype(np.float32),
                                       0.9, truncate=2.5)
        tex -= dots * np.float32(5.0 * 1.5 * s.texture_amplitude)
        I += tex * texture_gain[lab]
        # mitochondria, only inside their own neurite, away from the membrane
        mit *= (dist > half_t + 1.0)
        I -= np.float32(s.mito_darkness) * mit
        # vesicles in boutons
        if s.vesicle_density > 0 and is_bouton.any():
            cand = is_bouton[lab] & (dist > half_t + s.vesicle_radius_px + 0.5) & (mit == 0)
            cidx = np.flatnonzero(cand)
            nv = int(rng_org.poisson(s.vesicle_density * cidx.size))
            if nv and cidx.size:
                pick = cidx[rng_org.integers(0, cidx.size, nv)]
                ves = np.zeros((H + 2 * rk, W + 2 * rk), np.float32)
                for py, px in zip(*np.unravel_index(pick, (H, W))):
                    sub = ves[py:py + 2 * rk + 1, px:px + 2 * rk + 1]
                    np.maximum(sub, ring, out=sub)
                I -= np.float32(0.55 * s.membrane_darkness) * ves[rk:rk + H, rk:rk + W]
        # membrane with a smooth profile; ECS as light gaps
        prof = 1.0 / (1.0 + np.exp(np.minimum((dist - half_t) / 0.6, 40.0)))
        I = I * (1.0 - np.float32(s.membrane_darkness) * prof.astype(np.float32))
        if s.ecs_fraction > 0:
            ecs_soft = ndimage.gaussian_filter(ecs.astype(np.float32), 0.7)
            ecs_soft *= (1 - prof)
            I = I * (1 - ecs_soft) + np.float32(min(1.0, s.cytoplasm_intensity + 0.12)) * ecs_soft

        # --- imaging chain
        if s.blur_sigma_px > 0.05:
            I = ndimage.gaussian_filter(I, s.blur_sigma_px, truncate=3.0)
        I = (I - 0.5) * np.float32(s.contrast) + 0.5 + np.float32(s.brightness)
        I += ramp * np.float32(s.gradient * (1 + grad_drift * t))
        np.clip(I, 0.0, 1.0, out=I)
        if s.gamma != 1.0:
            I **= np.float32(s.gamma)
        I = rng_img.poisson(I * np.float32(s.photons)).astype(np.float32) / np.float32(s.photons)
        I += rng_img.standard_normal((H, W), dtype=np.float32) * np.float32(s.read_noise)
        if s.invert:
            I = 1.0 - I
        image[z] = I

    masks = None
    if artefacts is not None:
        masks = {k: np.zeros((Z, H, W), bool) for k in artefacts}
        for z in range(Z):
            for k in ARTEFACT_KINDS:  # fixed order: the draws do not depend on dict order
                if k not in artefacts:
                    continue
                hit = rng_art.random() < float(artefacts[k])
                sub_seed = int(rng_art.integers(0, 2**63 - 1))
                if hit:
                    image[z], masks[k][z] = _artefact_float(image[z], k, np.random.default_rng(sub_seed))

    img8 = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
    import fastremap

    labels, _ = fastremap.renumber(labels, preserve_zero=True, in_place=True)
    labels = labels.astype(np.uint32, copy=False)
    if is2d:
        img8, labels = img8[0], labels[0]
        if masks is not None:
            masks = {k: m[0] for k, m in masks.items()}
    return (img8, labels) if masks is None else (img8, labels, masks)


# ----------------------------------------------------------------------------- artefacts
def _artefact_float(img: np.ndarray, kind: str, rng: np.random.Generator):
    """Apply one artefact to a float32 2-D slice in [0, 1]; returns (new slice, bool mask)."""
    from scipy import ndimage

    H, W = img.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    out = img.astype(np.float32, copy=True)
    if kind == "fold":
        # a dark band along a gently curved line: the section folded onto itself
        ang = rng.uniform(0, np.pi)
        c, s_ = math.cos(ang), math.sin(ang)
        off = rng.uniform(0.2, 0.8) * (abs(c) * H + abs(s_) * W) - 0.5 * (abs(c) * H + abs(s_) * W)
        d = (yy - H / 2) * c + (xx - W / 2) * s_ - off
        along = -(yy - H / 2) * s_ + (xx - W / 2) * c
        d += rng.uniform(2, 10) * np.sin(along / rng.uniform(30, 120) + rng.uniform(0, 2 * np.pi))
        width = rng.uniform(3, 14)
        # the mask holds every pixel the fold changes (the dark core and its soft edge)
        core = np.where(np.abs(d) < width, np.exp(-(d / (width / 2)) ** 2), 0.0).astype(np.float32)
        mask = core > 0
        out = out * (1 - 0.75 * core) + 0.02 * core
    elif kind == "stain":
        # a blob of precipitate: dark, irregular, sharp-ish edge
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        r = rng.uniform(0.05, 0.2) * min(H, W) + 4
        n = _smooth_noise_2d(rng, (H, W), max(2.0, r / 4), out_std=0.35)
        rr = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r + n
        mask = rr < 1.0
        soft = np.clip((1.0 - rr) / 0.15, 0, 1)
        level = rng.uniform(0.05, 0.25) if rng.random() < 0.8 else rng.uniform(0.85, 1.0)
        out = out * (1 - 0.85 * soft) + level * 0.85 * soft
    elif kind == "defocus":
        out = ndimage.gaussian_filter(out, rng.uniform(2.0, 5.0), truncate=3.0)
        mask = np.ones((H, W), bool)
    elif kind == "brightness_jump":
        gain = rng.uniform(1.25, 1.6) if rng.random() < 0.5 else rng.uniform(0.5, 0.75)
        out = np.clip((out - 0.5) * rng.uniform(0.8, 1.2) + 0.5, 0, 1) * gain + rng.uniform(-0.1, 0.1)
        mask = np.ones((H, W), bool)
    elif kind == "missing_section":
        # a lost section is typically replaced by black (or empty-beam) pixels
        level = 0.0 if rng.random() < 0.7 else rng.uniform(0.6, 0.9)
        out = np.full((H, W), level, np.float32) + rng.standard_normal((H, W), dtype=np.float32) * 0.01
        mask = np.ones((H, W), bool)
    else:
        raise InputValueError(f"expected an artefact kind from {ARTEFACT_KINDS}, got {kind!r}")
    return np.clip(out, 0, 1).astype(np.float32), mask


def apply_artefact(tile, kind: str, *, seed):
    """Apply one artefact to a tile (for QC tests and augmentation).

    Parameters
    ----------
    tile : numpy.ndarray
        2-D image, or a 3-D stack (each slice gets its own draw). uint8 (0-255) or float in
        [0, 1]; not modified.
    kind : str
        One of :data:`ARTEFACT_KINDS`.
    seed : int

    Returns
    -------
    tile : numpy.ndarray
        A new array of the input's dtype.
    mask : numpy.ndarray
        bool, the tile's shape: where the artefact is.

    Examples
    --------
    >>> img, _ = make_domain(None, (64, 64), seed=1)
    >>> out, m = apply_artefact(img, "stain", seed=0)
    >>> out.dtype, m.dtype
    (dtype('uint8'), dtype('bool'))
    """
    a = np.asarray(tile)
    if a.ndim not in (2, 3):
        raise ShapeError(f"expected a 2-D tile or a 3-D stack, got shape {a.shape}")
    if kind not in ARTEFACT_KINDS:
        raise InputValueError(f"expected an artefact kind from {ARTEFACT_KINDS}, got {kind!r}")
    is_u8 = a.dtype == np.uint8
    f = a.astype(np.float32) / 255.0 if is_u8 else a.astype(np.float32)
    rng = np.random.default_rng(int(seed))
    stack = f[None] if f.ndim == 2 else f
    out = np.empty_like(stack)
    mask = np.zeros(stack.shape, bool)
    for i in range(stack.shape[0]):
        out[i], mask[i] = _artefact_float(stack[i], kind, rng)
    if a.ndim == 2:
        out, mask = out[0], mask[0]
    if is_u8:
        return np.rint(out * 255).astype(np.uint8), mask
    return out.astype(a.dtype if a.dtype.kind == "f" else np.float32), mask


# ----------------------------------------------------------------------------- families
#: The traits :func:`domain_family` drifts with ``traits="morphology"``: the tissue's geometry and
#: content and the imaging resolution and noise. The intensity traits (membrane and cytoplasm darkness,
#: contrast, gamma, brightness, gradient, ...) stay at the root's values, because the models are
#: trained with intensity jitter on percentile-normalised images and are built not to see them.
MORPHOLOGY_TRAITS = ("cell_diameter_px", "size_variability", "warp_amplitude_px", "membrane_thickness_px",
                     "ecs_fraction", "ecs_width_px", "mito_fraction", "mito_size_px", "vesicle_fraction",
                     "vesicle_radius_px", "vesicle_density", "texture_amplitude", "texture_scale_px",
                     "blur_sigma_px", "photons", "read_noise")

FAMILY_TREES = ("coalescent", "yule")
FAMILY_TRAITS = ("morphology", "all")


def _yule_tree(rng, n):
    """Random leaf splits, branch lengths uniform in [0.2, 1.0]: (parent, branch length, children, leaves)."""
    parent, bl, children, leaves = [-1], [0.0], [[]], [0]
    while len(leaves) < n:
        node = leaves.pop(int(rng.integers(0, len(leaves))))
        for _ in range(2):
            parent.append(node)
            bl.append(float(np.round(rng.uniform(0.2, 1.0), 4)))
            children.append([])
            children[node].append(len(parent) - 1)
            leaves.append(len(parent) - 1)
    return parent, bl, children, sorted(leaves)


def _coalescent_tree(rng, n, height):
    """Kingman coalescent scaled to root height ``height`` (ultrametric: every leaf at the same
    depth). Returns (parent, branch length, children, leaves) with node 0 the root, like
    :func:`_yule_tree`; leaves are numbered in a random order, so names carry no tree order."""
    if n == 1:
        return [-1], [0.0], [[]], [0]
    times = {i: 0.0 for i in range(n)}  # leaf ids 0..n-1, internal ids n..2n-2
    kids: dict[int, list[int]] = {}
    lineages, t, nxt = list(range(n)), 0.0, n
    while len(lineages) > 1:
        k = len(lineages)
        t += float(rng.exponential(2.0 / (k * (k - 1))))
        a, b = sorted(rng.choice(k, size=2, replace=False), reverse=True)
        la, lb = lineages.pop(int(a)), lineages.pop(int(b))
        kids[nxt], times[nxt] = [lb, la], t
        lineages.append(nxt)
        nxt += 1
    scale = height / t
    # renumber: root first (breadth first), leaves in a random order of the remaining ids
    root = lineages[0]
    order, queue = [], [root]
    while queue:
        v = queue.pop(0)
        order.append(v)
        queue += kids.get(v, [])
    new_id = {v: i for i, v in enumerate(order)}
    parent, bl, children = [-1] * len(order), [0.0] * len(order), [[] for _ in order]
    for v, cs in kids.items():
        for c in cs:
            parent[new_id[c]] = new_id[v]
            bl[new_id[c]] = float(np.round((times[v] - times[c]) * scale, 4))
            children[new_id[v]].append(new_id[c])
    leaves = [new_id[i] for i in rng.permutation(n)]
    return parent, bl, children, leaves


def domain_family(n: int, *, seed, root: DomainStyle | None = None, drift: float = 0.6,
                  prefix: str = "syn", tree: str = "coalescent", traits: str = "morphology",
                  height: float = 2.0, return_patristic: bool = False):
    """``n`` domain styles at the leaves of a random tree, and the tree in Newick.

    Traits evolve along the tree by Brownian motion: every node's parameter vector
    (:meth:`DomainStyle.to_vector`, unbounded coordinates) is its parent's plus a drift of
    variance ``drift**2 * branch_length`` per drifting trait. Two trees are available:

    * ``tree="coalescent"`` (default): a Kingman coalescent scaled to root height ``height``,
      ultrametric like a divergence-time tree, with short recent branches and long deep ones.
      The drifts of the ``2n - 2`` branches are mutually orthogonal whenever there are at least
      as many traits as branches (scaled to the expected Brownian norm), so the squared
      parameter distance between two leaves is *exactly* ``drift**2 * n_traits * path_length``
      rather than only in expectation.
    * ``tree="yule"``: random leaf splits with branch lengths uniform in [0.2, 1.0] and
      independent Gaussian drifts (the generator before 2026-11-25; ``height`` unused).

    ``traits="morphology"`` (default) drifts :data:`MORPHOLOGY_TRAITS` only; ``"all"`` drifts
    every parameter. How faithfully image features follow the tree depends on the rendering,
    which is nonlinear in the parameters: see ``docs/data.md`` for measurements.

    Parameters
    ----------
    n : int
        Number of styles (leaves), >= 1.
    seed : int
        The tree and the drifts follow from it.
    root : DomainStyle, optional
        The root's style (default: the default style with a small random perturbation).
    drift : float
        Drift scale per unit branch length (in logit units).
    prefix : str
        Leaf names are ``f"{prefix}{i:02d}"``.
    tree : {"coalescent", "yule"}
        The tree model (above).
    traits : {"morphology", "all"}
        Which parameters drift (above).
    height : float
        Root height of the coalescent tree (> 0).
    return_patristic : bool
        Also return the tree's patristic (path-length) distances between the leaves.

    Returns
    -------
    styles : list of DomainStyle
        ``styles[i].name`` is the i-th leaf's name in the Newick string.
    newick : str
        The tree with branch lengths, e.g. ``"((syn00:0.41,syn01:0.77):0.33,syn02:0.95);"``.
    patristic : numpy.ndarray
        Only with ``return_patristic``: ``(n, n)`` float64, ``patristic[i, j]`` the path length
        between ``styles[i]`` and ``styles[j]`` (the branch lengths the Newick string records).

    Examples
    --------
    >>> styles, tree = domain_family(3, seed=0)
    >>> [s.name for s in styles], tree.endswith(";")
    (['syn00', 'syn01', 'syn02'], True)
    """
    n = int(n)
    if n < 1:
        raise InputValueError(f"expected n >= 1 styles, got {n}")
    if not (drift >= 0):
        raise InputValueError(f"expected drift >= 0, got {drift}")
    if tree not in FAMILY_TREES:
        raise InputValueError(f"expected tree in {FAMILY_TREES}, got {tree!r}")
    if traits not in FAMILY_TRAITS:
        raise InputValueError(f"expected traits in {FAMILY_TRAITS}, got {traits!r}")
    if not (height > 0 and math.isfinite(height)):
        raise InputValueError(f"expected a finite height > 0, got {height!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    n_par = len(PARAMETER_BOUNDS)
    if root is None:
        u_root = DomainStyle().to_vector() + rng.normal(0, 0.3, n_par)
        invert = False
    else:
        u_root = root.to_vector()
        invert = root.invert
    if tree == "yule":
        parent, bl, children, leaves = _yule_tree(rng, n)
    else:
        parent, bl, children, leaves = _coalescent_tree(rng, n, float(height))
    keys = list(PARAMETER_BOUNDS)
    drifting = np.array([k in MORPHOLOGY_TRAITS for k in keys]) if traits == "morphology" else np.ones(n_par, bool)
    n_traits = int(drifting.sum())
    n_branch = len(parent) - 1
    if tree == "coalescent" and 0 < n_branch <= n_traits:
        # orthonormal directions, one per branch, each scaled to the Brownian expected norm
        q, _ = np.linalg.qr(rng.normal(size=(n_traits, n_branch)))
        steps = [q[:, i - 1] * drift * math.sqrt(n_traits * bl[i]) for i in range(1, len(parent))]
    else:
        steps = [rng.normal(0, drift * math.sqrt(bl[i]), n_traits) for i in range(1, len(parent))]
    u = [u_root] + [None] * n_branch
    for i in range(1, len(parent)):  # parents precede their children in both trees
        step = np.zeros(n_par)
        step[drifting] = steps[i - 1]
        u[i] = u[parent[i]] + step
    names = {node: f"{prefix}{i:02d}" for i, node in enumerate(leaves)}
    styles = [DomainStyle.from_vector(u[node], name=names[node], invert=invert) for node in leaves]

    def newick(node):
        if not children[node]:
            txt = names[node]
        else:
            txt = "(" + ",".join(newick(c) for c in children[node]) + ")"
        return txt + (f":{bl[node]:g}" if node != 0 else "")

    if not return_patristic:
        return styles, newick(0) + ";"
    return styles, newick(0) + ";", _patristic(parent, bl, leaves)


def _patristic(parent: list[int], bl: list[float], leaves: list[int]) -> np.ndarray:
    """Path lengths between ``leaves`` of a tree given as parent indices and branch lengths."""
    def up(node: int) -> dict[int, float]:
        """Every ancestor of ``node`` (itself included) -> its distance from ``node``."""
        out, d = {}, 0.0
        while node != -1:
            out[node] = d
            d += bl[node]
            node = parent[node]
        return out

    anc = [up(v) for v in leaves]
    k = len(leaves)
    dist = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            # the lowest common ancestor is the shared one nearest to both
            dist[i, j] = dist[j, i] = min(anc[i][a] + anc[j][a] for a in anc[i].keys() & anc[j].keys())
    return dist
