"""Exact ray casting of the spatial scenes: spheres, yawed cubes and vertical cylinders on a
checkered ground plane, seen by a pinhole camera pitched down (trainer.data.spatial).

One numba kernel visits every supersampled pixel once: the ray hits the ground or the sky, then
each object whose screen box holds the pixel is intersected exactly (sphere: quadratic; cube: slabs
in its yawed frame; cylinder: side quadratic + top cap) and depth-tested -- the per-pixel form of
the painter's algorithm, right even where objects interleave in depth. Lambert shading, distance
haze on the ground, ss x ss supersampling. Besides the image it returns an id buffer (which object
each supersampled pixel shows) and each object's unoccluded silhouette size, from which the
dataset derives visible boxes and visibility checks.

Frames: world x right, y up, z ahead of the camera (which stands at (0, elevation, 0)); camera
coordinates x right, y down, z forward (OpenCV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

COLORS = {
    "red": (215, 45, 45), "green": (50, 170, 70), "blue": (45, 85, 215), "yellow": (235, 200, 35),
    "purple": (145, 65, 190), "cyan": (50, 195, 205), "orange": (240, 125, 35), "gray": (135, 135, 135),
}  # fmt: skip
SHAPES = ("sphere", "cube", "cylinder")
LIGHT = np.array([-0.45, 0.8, -0.4]) / np.linalg.norm([-0.45, 0.8, -0.4])


@dataclass(frozen=True)
class Object3D:
    shape: str
    color: str
    size: float  # sphere/cylinder radius, cube half-side (m)
    x: float  # ground position (world: x right, y up, z ahead of the camera)
    z: float
    yaw: float  # cube rotation about the vertical axis (rad)

    @property
    def height(self) -> float:
        return 2.4 * self.size if self.shape == "cylinder" else 2.0 * self.size

    @property
    def center(self) -> np.ndarray:
        return np.array([self.x, self.height / 2, self.z])

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Camera:
    width: int
    height: int
    elevation: float  # camera height above the ground (m)
    pitch: float  # downward tilt (rad)
    focal: float  # px

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World directions of the camera's x (right), y (down, in the image) and z (forward)."""
        s, c = math.sin(self.pitch), math.cos(self.pitch)
        return np.array([1.0, 0.0, 0.0]), np.array([0.0, -c, -s]), np.array([0.0, -s, c])

    @property
    def origin(self) -> np.ndarray:
        return np.array([0.0, self.elevation, 0.0])

    def to_camera(self, p: np.ndarray) -> np.ndarray:
        right, down, fwd = self.axes()
        d = p - self.origin
        return np.array([d @ right, d @ down, d @ fwd])


_SHAPE_CODE = {"sphere": 0, "cube": 1, "cylinder": 2}
_GROUND = np.array([[150.0, 142.0, 128.0], [188.0, 178.0, 160.0]])
_SKY = np.array([200.0, 215.0, 235.0])


@numba.njit(cache=True, nogil=True)
def _hit(code, size, height, x, z, c, s, ox, oy, oz, dx, dy, dz):
    """Ray (o + t d) against one object (c, s: cosine and sine of its yaw): (t, normal), t = inf
    on a miss."""
    inf = np.inf
    if code == 0:  # sphere resting on the ground
        cx, cy, cz = ox - x, oy - size, oz - z
        a = dx * dx + dy * dy + dz * dz
        b = 2.0 * (dx * cx + dy * cy + dz * cz)
        disc = b * b - 4.0 * a * (cx * cx + cy * cy + cz * cz - size * size)
        if disc < 0.0:
            return inf, 0.0, 0.0, 0.0
        t = (-b - np.sqrt(disc)) / (2.0 * a)
        if t <= 0.0:
            return inf, 0.0, 0.0, 0.0
        return t, cx + t * dx, cy + t * dy, cz + t * dz
    if code == 1:  # cube yawed about the vertical axis; slabs in its own frame
        px, py, pz = ox - x, oy - size, oz - z
        o3 = (c * px - s * pz, py, s * px + c * pz)
        d3 = (c * dx - s * dz, dy, s * dx + c * dz)
        tmin, tmax, axis, sign = -inf, inf, 0, 0.0
        for i in range(3):
            di = d3[i] if abs(d3[i]) > 1e-12 else 1e-12
            t1, t2 = (-size - o3[i]) / di, (size - o3[i]) / di
            lo, hi = min(t1, t2), max(t1, t2)
            if lo > tmin:
                tmin, axis, sign = lo, i, -1.0 if di > 0 else 1.0
            tmax = min(tmax, hi)
        if tmin > tmax or tmin <= 0.0:
            return inf, 0.0, 0.0, 0.0
        if axis == 0:  # back to the world frame: the transpose of the rotation above
            return tmin, c * sign, 0.0, -s * sign
        if axis == 1:
            return tmin, 0.0, sign, 0.0
        return tmin, s * sign, 0.0, c * sign
    # vertical cylinder standing on the ground: side, or the top cap
    px, pz = ox - x, oz - z
    a = dx * dx + dz * dz
    b = 2.0 * (px * dx + pz * dz)
    disc = b * b - 4.0 * a * (px * px + pz * pz - size * size)
    t_side = inf
    if disc >= 0.0 and a > 1e-12:
        t = (-b - np.sqrt(disc)) / (2.0 * a)
        y = oy + t * dy
        if t > 0.0 and 0.0 <= y <= height:
            t_side = t
    t_cap = inf
    if abs(dy) > 1e-12:
        t = (height - oy) / dy
        qx, qz = px + t * dx, pz + t * dz
        if t > 0.0 and qx * qx + qz * qz <= size * size:
            t_cap = t
    if t_cap < t_side:
        return t_cap, 0.0, 1.0, 0.0
    if t_side < inf:
        return t_side, px + t_side * dx, 0.0, pz + t_side * dz
    return inf, 0.0, 0.0, 0.0


@numba.njit(cache=True, nogil=True)
def _render_kernel(
    width, height, ss, focal, elevation, pitch, objs, boxes, colors, light, image, ids, silhouettes
):
    """Ray cast every supersampled pixel: ground/sky, then the nearest object (a depth test per
    pixel; each object only inside its screen box), Lambert-shaded; ``image`` accumulates the mean
    over each pixel's ss x ss samples."""
    sp, cp = np.sin(pitch), np.cos(pitch)
    f = focal * ss
    W, H = width * ss, height * ss
    inv = 1.0 / (ss * ss)
    for i in range(H):
        v = (i + 0.5 - H / 2) / f
        for j in range(W):
            u = (j + 0.5 - W / 2) / f
            dx, dy, dz = u, -cp * v - sp, -sp * v + cp  # right*u + down*v + forward
            if dy < 0.0:
                tg = -elevation / dy
                gx, gz = tg * dx, tg * dz
                tile = int(np.floor(gx) + np.floor(gz)) & 1
                haze = min(max((np.sqrt(gx * gx + gz * gz) - 4.0) / 14.0, 0.0), 1.0)
                r = _GROUND[tile, 0] * (1 - haze) + _SKY[0] * haze
                g = _GROUND[tile, 1] * (1 - haze) + _SKY[1] * haze
                b = _GROUND[tile, 2] * (1 - haze) + _SKY[2] * haze
            else:
                r, g, b = _SKY[0], _SKY[1], _SKY[2]
            best, best_k, bnx, bny, bnz = np.inf, -1, 0.0, 0.0, 0.0
            for k in range(objs.shape[0]):
                if i < boxes[k, 0] or i >= boxes[k, 1] or j < boxes[k, 2] or j >= boxes[k, 3]:
                    continue
                t, nx, ny, nz = _hit(
                    int(objs[k, 0]), objs[k, 1], objs[k, 2], objs[k, 3], objs[k, 4], objs[k, 5], objs[k, 6],
                    0.0, elevation, 0.0, dx, dy, dz,
                )  # fmt: skip
                if t < np.inf:
                    silhouettes[k] += 1
                    if t < best:
                        best, best_k, bnx, bny, bnz = t, k, nx, ny, nz
            ids[i, j] = best_k
            if best_k >= 0:
                norm = max(np.sqrt(bnx * bnx + bny * bny + bnz * bnz), 1e-12)
                lam = (bnx * light[0] + bny * light[1] + bnz * light[2]) / norm
                shade = 0.35 + 0.65 * min(max(lam, 0.0), 1.0)
                r, g, b = colors[best_k, 0] * shade, colors[best_k, 1] * shade, colors[best_k, 2] * shade
            image[i // ss, j // ss, 0] += r * inv
            image[i // ss, j // ss, 1] += g * inv
            image[i // ss, j // ss, 2] += b * inv


def _screen_box(cam: Camera, obj: Object3D, ss: int) -> tuple[int, int, int, int]:
    """Rows and columns [y0, y1) x [x0, x1) of the supersampled image that can show ``obj``: the
    projection of a box around it (a yawed cube's footprint fits in a square of half-side
    size * sqrt(2)), widened by a pixel."""
    r = obj.size * math.sqrt(2)
    H, W = cam.height * ss, cam.width * ss
    u, v = [], []
    for dx in (-r, r):
        for dz in (-r, r):
            for y in (0.0, obj.height):
                x, y_, z = cam.to_camera(np.array([obj.x + dx, y, obj.z + dz]))
                if z <= 1e-3:  # behind the camera: no useful bound
                    return 0, H, 0, W
                u.append(W / 2 + cam.focal * ss * x / z)
                v.append(H / 2 + cam.focal * ss * y_ / z)
    clamp = lambda a, hi: min(max(a, 0), hi)
    return (
        clamp(math.floor(min(v)) - 1, H), clamp(math.ceil(max(v)) + 2, H),
        clamp(math.floor(min(u)) - 1, W), clamp(math.ceil(max(u)) + 2, W),
    )  # fmt: skip


def render(
    cam: Camera, objects: tuple[Object3D, ...], ss: int = 2
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(H, W, 3) uint8 image, the (H*ss, W*ss) int8 id buffer (-1: ground or sky), and each
    object's unoccluded silhouette in supersampled pixels."""
    objs = np.array(
        [
            [_SHAPE_CODE[o.shape], o.size, o.height, o.x, o.z, math.cos(o.yaw), math.sin(o.yaw)]
            for o in objects
        ],
        dtype=np.float64,
    ).reshape(-1, 7)
    boxes = np.array([_screen_box(cam, o, ss) for o in objects], dtype=np.int64).reshape(-1, 4)
    colors = np.array([COLORS[o.color] for o in objects], dtype=np.float64).reshape(-1, 3)
    image = np.zeros((cam.height, cam.width, 3))
    ids = np.empty((cam.height * ss, cam.width * ss), dtype=np.int8)
    silhouettes = np.zeros(len(objects), dtype=np.int64)
    _render_kernel(
        cam.width,
        cam.height,
        ss,
        cam.focal,
        cam.elevation,
        cam.pitch,
        objs,
        boxes,
        colors,
        LIGHT,
        image,
        ids,
        silhouettes,
    )
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), ids, tuple(int(v) for v in silhouettes)
