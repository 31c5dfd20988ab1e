"""Everything for images in one place: folders, transforms, models, and showing them.

`from nanofit.vision import ImageFolder, Normalize, random_flip, simple_cnn, show_results`
"""
from .augment import Normalize, compose, random_crop, random_erase, random_flip
from .callbacks.transforms import BatchTransformCB
from .images import ImageFolder, image_files, show_images
from .inference import show_results
from .models import ResBlock, conv, resnet, simple_cnn
from .plots import get_grid, show_image, subplots

__all__ = ["ImageFolder", "image_files", "show_images", "show_results", "Normalize",
           "BatchTransformCB", "compose", "random_crop", "random_erase", "random_flip", "conv",
           "ResBlock", "simple_cnn", "resnet", "show_image", "subplots", "get_grid"]
