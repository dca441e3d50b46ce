"""augsearch: learned class-specific training-time and test-time augmentation for medical image segmentation."""

__version__ = "0.1.0"
