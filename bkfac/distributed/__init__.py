"""bkfac.distributed"""
