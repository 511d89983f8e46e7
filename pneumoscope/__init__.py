"""pneumoscope: pneumonia detection on chest X-rays.

Nothing heavy is imported here: `import pneumoscope` is instant, torch is loaded only by the
modules that need it (models, train, predict, ...).
"""
__version__ = "0.1.0"

__all__ = ["__version__"]
