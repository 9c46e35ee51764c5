"""SoftHSM2 fixtures (filled in with the PKCS#11 signer)."""
