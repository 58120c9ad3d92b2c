"""Deep features from MONAI encoders (2D and 3D) with Grad-CAM attention maps; ``train-deep``.

torch and monai are imported only inside these modules' functions, never by the registry.
"""
