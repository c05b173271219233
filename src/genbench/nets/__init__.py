"""Every network architecture, and how genbench trains its auxiliary networks locally.

- autoencoders.py: MLP/conv encoders and decoders (vector latents), the VQ models' grid encoder/decoder;
- unet.py: the denoising U-Net of DDPM and latent diffusion;
- transformer.py: the causal transformer prior over VQ codes;
- attention.py: the scaled dot-product attention both use (explicit in bf16 on CPU, fused elsewhere);
- discriminator.py: the PatchGAN discriminator of VQ-GAN;
- classifier.py: the evaluation classifier (its features judge every model);
- perceptual.py: VQ-GAN's perceptual network (a rotation-prediction VGG, never the judge);
- local.py: the seeded training loop and content-hash cache shared by the last two.
"""
