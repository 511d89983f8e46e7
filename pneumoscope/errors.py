"""Exception types. Every message names the file or value at fault and how to fix it."""


class PneumoscopeError(Exception):
    """Base class of every error pneumoscope raises on purpose."""


class ImageReadError(PneumoscopeError, ValueError):
    """A file could not be read as an image (corrupt, truncated, empty, not an image)."""


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than the configured limit (decompression-bomb guard)."""

    @classmethod
    def of(cls, name: str, pixels: int | None, limit: int, size: tuple[int, int] | None = None) -> "ImageTooLargeError":
        """THE message for an image over the pixel limit, whichever reader (Pillow, pydicom) noticed it."""
        what = (f"{size[0]}x{size[1]} = {pixels:,} pixels" if size else f"{pixels:,} pixels" if pixels
                else "too many pixels")
        side = int(limit ** 0.5)
        return cls(f"{name}: {what} exceeds the limit of {limit:,} pixels (decompression-bomb guard); downscale the "
                   f"image to at most about {side} x {side} pixels and send it again")


class IntensityRangeError(PneumoscopeError, ValueError):
    """An image array is outside the checked intensity range [0, 1] or not finite."""


class DicomError(ImageReadError):
    """A DICOM file is malformed, has no pixel data, or is not a radiograph."""


class DatasetLayoutError(PneumoscopeError, ValueError):
    """A data folder does not have a layout pneumoscope understands (or holds no images)."""


class DuplicateAcrossSplitsError(PneumoscopeError, ValueError):
    """The same image content occurs in two splits (leakage)."""


class DownloadError(PneumoscopeError, RuntimeError):
    """A download failed, was interrupted beyond retry, or did not match its checksum."""


class ConfigError(PneumoscopeError, ValueError):
    """A configuration value is invalid."""


class CheckpointError(PneumoscopeError, ValueError):
    """A checkpoint file is missing, corrupt, or incompatible."""
