"""Image-fed runs (mode=end2end, mode=finetune): images, the TokenEncoder, their inputs."""
