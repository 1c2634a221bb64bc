"""The one exception type yoloprune raises for problems a user can fix."""


class YoloPruneError(Exception):
    """A problem with the user's input, stated with its fix; the CLI prints it as one line."""


def check_imgsz(imgsz: object, stride: int = 32) -> None:
    """Raise ``YoloPruneError`` unless ``imgsz`` is a positive multiple of ``stride``, naming the nearest valid size."""
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0 or imgsz % stride:
        nearest = max(stride, round(imgsz / stride) * stride) if isinstance(imgsz, (int, float)) else 640
        raise YoloPruneError(f"imgsz must be a positive multiple of the model stride {stride}, got {imgsz!r}; "
                             f"use {nearest}")
