"""Head pose (yaw, pitch, roll in degrees) from the 5 canonical landmarks.

A generic 3D face (millimetres; x right, y down, z away from the camera) is fitted to the
landmarks with OpenCV's PnP solver and a pinhole camera guessed from the image size. It is a
coarse estimate, good for comparing two photos of a pair (pose_diff), not for metrology.
"""

from __future__ import annotations

import cv2
import numpy as np

# eye (image left), eye (image right), nose tip, mouth corner (image left), (image right)
GENERIC_FACE_3D = np.array(
    [
        [-31.5, -33.0, 30.0],
        [31.5, -33.0, 30.0],
        [0.0, 0.0, 0.0],
        [-25.0, 30.0, 25.0],
        [25.0, 30.0, 25.0],
    ],
    dtype=np.float64,
)


def head_pose(landmarks: np.ndarray, width: int, height: int) -> tuple[float, float, float]:
    """Return (yaw, pitch, roll) in degrees; all zero for a frontal, upright face."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    focal = float(max(width, height))
    camera = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], np.float64)
    ok, rvec, tvec = cv2.solvePnP(GENERIC_FACE_3D, pts, camera, None, flags=cv2.SOLVEPNP_EPNP)
    if ok:
        ok, rvec, tvec = cv2.solvePnP(
            GENERIC_FACE_3D, pts, camera, None, rvec, tvec, True, cv2.SOLVEPNP_ITERATIVE
        )
    if not ok or not np.all(np.isfinite(rvec)):
        return float("nan"), float("nan"), float("nan")
    rotation, _ = cv2.Rodrigues(rvec)
    pitch, yaw, roll = cv2.RQDecomp3x3(rotation)[0]
    # RQDecomp3x3 may report a flipped pitch near +-180 for a face seen from the front
    pitch = (pitch + 180.0) % 360.0 - 180.0
    if abs(pitch) > 90.0:
        pitch = pitch - 180.0 if pitch > 0 else pitch + 180.0
    return float(yaw), float(pitch), float(roll)


def pose_difference(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Euclidean distance between two (yaw, pitch, roll) triples, in degrees."""
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))
