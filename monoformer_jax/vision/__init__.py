"""Images to READ, as the model's vision encoder takes them (the encoders are model/'s).

inputs.py       `read_inputs`: paths, PIL images or arrays as the encoder's
                input: pixels, SD-VAE latents, or CLIP's pixels
clip_pixels.py  CLIP's preprocessing (HF CLIPImageProcessor's pixels)
"""
