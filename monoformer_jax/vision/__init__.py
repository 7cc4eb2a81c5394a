"""Images to READ, as the model's vision encoder takes them (the encoders are model/'s).

images.py       `load_image`: the one image reader (files, bytes, PIL images,
                arrays -> 8-bit L or RGB; 16-bit, alpha on white, EXIF, limits)
inputs.py       `read_inputs`: paths, PIL images or arrays as the encoder's
                input: pixels, SD-VAE latents, or CLIP's pixels
clip_pixels.py  CLIP's preprocessing (HF CLIPImageProcessor's pixels)
"""
