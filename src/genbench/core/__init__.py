"""The lecture's math, with no networks and no I/O.

- gaussian.py: univariate, diagonal and full-covariance Gaussians, reparameterization, closed-form
  KL, decoder likelihoods, the ELBO and its gap, the IWAE bound, probabilistic PCA;
- diffusion.py: noise schedules, the forward process q(x_t | x_0), training targets and losses, the
  one map from a network output to (x0, eps), the variational bound;
- samplers.py: DDPM, DDIM, DPM-Solver++(2M) and Heun sampling loops over the precomputed coefficients;
- quantizer.py: vector quantization (nearest code, straight-through, codebook and commitment
  losses, EMA codebook, k-means++ init, dead-code restarts);
- losses.py: the adversarial (hinge / vanilla) losses, VQ-GAN's adaptive weight, and the LPIPS-style
  perceptual distance.

docs/formulas.md maps every formula to the function here that implements it and the test that
checks it.
"""
