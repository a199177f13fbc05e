//! jsonwebtoken's signatures computed with ring, the one crypto library in Mangoo.
//!
//! Why not one of jsonwebtoken's own backends: its aws-lc-rs one would keep aws-lc-sys, a long C
//! build, in Mangoo only for this (TLS runs on ring); its RustCrypto one adds six curve and RSA
//! crates. This is the same thin mapping onto ring's API for the algorithms Mangoo accepts —
//! HS256 (its own tokens), RS256 and ES256 (identity providers' key sets) — plus HS384/HS512,
//! which tests sign to check they are refused. A token naming any other algorithm is refused by
//! the validation before it gets here, and this provider refuses it again.

use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::{digest, hmac, signature as ring_sig};

/// The provider Mangoo installs at start-up.
pub static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    jwk_utils: JwkUtils {
        extract_rsa_public_key_components,
        extract_ec_public_key_coordinates,
        compute_digest,
    },
};

fn unsupported(algorithm: &Algorithm) -> Error {
    ErrorKind::Provider(format!("{algorithm:?} is not accepted by Mangoo")).into()
}

fn new_signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    match algorithm {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            Ok(Box::new(Hmac::new(*algorithm, key.try_get_hmac_secret()?)))
        }
        Algorithm::ES256 => {
            let pair = ring_sig::EcdsaKeyPair::from_pkcs8(
                &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                key.inner(),
                &SystemRandom::new(),
            )
            .map_err(|_| ErrorKind::InvalidEcdsaKey)?;
            Ok(Box::new(Es256Signer(pair)))
        }
        Algorithm::RS256 => {
            let pair = ring_sig::RsaKeyPair::from_der(key.inner())
                .map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))?;
            Ok(Box::new(Rs256Signer(pair)))
        }
        other => Err(unsupported(other)),
    }
}

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    match algorithm {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            Ok(Box::new(Hmac::new(*algorithm, key.try_get_hmac_secret()?)))
        }
        Algorithm::ES256 if key.family() != AlgorithmFamily::Ec => {
            Err(ErrorKind::InvalidKeyFormat.into())
        }
        Algorithm::RS256 if key.family() != AlgorithmFamily::Rsa => {
            Err(ErrorKind::InvalidKeyFormat.into())
        }
        Algorithm::ES256 | Algorithm::RS256 => Ok(Box::new(PublicKeyVerifier {
            algorithm: *algorithm,
            key: key.clone(),
        })),
        other => Err(unsupported(other)),
    }
}

struct Hmac {
    algorithm: Algorithm,
    key: hmac::Key,
}

impl Hmac {
    fn new(algorithm: Algorithm, secret: &[u8]) -> Self {
        let hash = match algorithm {
            Algorithm::HS384 => hmac::HMAC_SHA384,
            Algorithm::HS512 => hmac::HMAC_SHA512,
            _ => hmac::HMAC_SHA256,
        };
        Self {
            algorithm,
            key: hmac::Key::new(hash, secret),
        }
    }
}

impl Signer<Vec<u8>> for Hmac {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(hmac::sign(&self.key, msg).as_ref().to_vec())
    }
}

impl Verifier<Vec<u8>> for Hmac {
    /// ring compares the tags in constant time.
    fn verify(&self, msg: &[u8], tag: &Vec<u8>) -> Result<(), signature::Error> {
        hmac::verify(&self.key, msg, tag).map_err(|_| signature::Error::new())
    }
}

impl JwtSigner for Hmac {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

impl JwtVerifier for Hmac {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

struct Es256Signer(ring_sig::EcdsaKeyPair);

impl Signer<Vec<u8>> for Es256Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let signature = self
            .0
            .sign(&SystemRandom::new(), msg)
            .map_err(|_| signature::Error::new())?;
        Ok(signature.as_ref().to_vec())
    }
}

impl JwtSigner for Es256Signer {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}

struct Rs256Signer(ring_sig::RsaKeyPair);

impl Signer<Vec<u8>> for Rs256Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let mut signature = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(
                &ring_sig::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                msg,
                &mut signature,
            )
            .map_err(|_| signature::Error::new())?;
        Ok(signature)
    }
}

impl JwtSigner for Rs256Signer {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

/// RS256 or ES256 against a public key: DER or raw point bytes, or an RSA modulus and exponent
/// (how JWKS delivers RSA keys).
struct PublicKeyVerifier {
    algorithm: Algorithm,
    key: DecodingKey,
}

impl Verifier<Vec<u8>> for PublicKeyVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let failed = |_| signature::Error::new();
        match (self.algorithm, self.key.kind()) {
            (Algorithm::RS256, DecodingKeyKind::RsaModulusExponent { n, e }) => {
                ring_sig::RsaPublicKeyComponents { n, e }
                    .verify(&ring_sig::RSA_PKCS1_2048_8192_SHA256, msg, signature)
                    .map_err(failed)
            }
            (Algorithm::RS256, DecodingKeyKind::SecretOrDer(der)) => {
                ring_sig::UnparsedPublicKey::new(&ring_sig::RSA_PKCS1_2048_8192_SHA256, der)
                    .verify(msg, signature)
                    .map_err(failed)
            }
            (Algorithm::ES256, DecodingKeyKind::SecretOrDer(point)) => {
                ring_sig::UnparsedPublicKey::new(&ring_sig::ECDSA_P256_SHA256_FIXED, point)
                    .verify(msg, signature)
                    .map_err(failed)
            }
            _ => Err(signature::Error::new()),
        }
    }
}

impl JwtVerifier for PublicKeyVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

fn extract_rsa_public_key_components(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let pair =
        ring_sig::RsaKeyPair::from_der(der).map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))?;
    let public = ring_sig::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
    Ok((public.n, public.e))
}

fn extract_ec_public_key_coordinates(
    pkcs8: &[u8],
    algorithm: Algorithm,
) -> Result<(EllipticCurve, Vec<u8>, Vec<u8>), Error> {
    if algorithm != Algorithm::ES256 {
        return Err(unsupported(&algorithm));
    }
    let pair = ring_sig::EcdsaKeyPair::from_pkcs8(
        &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8,
        &SystemRandom::new(),
    )
    .map_err(|_| ErrorKind::InvalidEcdsaKey)?;
    use ring_sig::KeyPair;
    match pair.public_key().as_ref() {
        [4, coordinates @ ..] if coordinates.len() == 64 => {
            let (x, y) = coordinates.split_at(32);
            Ok((EllipticCurve::P256, x.to_vec(), y.to_vec()))
        }
        _ => Err(ErrorKind::InvalidEcdsaKey.into()),
    }
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Vec<u8> {
    let algorithm = match hash {
        ThumbprintHash::SHA256 => &digest::SHA256,
        ThumbprintHash::SHA384 => &digest::SHA384,
        ThumbprintHash::SHA512 => &digest::SHA512,
    };
    digest::digest(algorithm, data).as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use jsonwebtoken::{Header, Validation, decode, encode};

    /// A 2048-bit RSA key (PKCS#1 DER, base64) made with `openssl genrsa` for these tests only.
    const TEST_RSA_KEY: &str = concat!(
        "MIIEpAIBAAKCAQEAxTXXjyHolQU13KNwNNq7acgAtz6F3prHi6prxglDfFenQDFgLMa4M/9rxnhWvcEi8pwFht6C",
        "MNlxe+cU39uubU6l1/joKJ5qMAMUPlZej/b8weobSAMaBcD/I2R78+3hNrrGoA8nn2zJp/k+/f7D1N41ABLqO8Ov",
        "gal5vl4vI0MDHADuEQJyJDKlOySQR0j+udzDynPboKE9AhlKxEeWaJTGANS24ziuRLrfyQYdzAyucJI4rt4W59F1",
        "9Ah2XAOxCDd17quaWHKkt7NPdY7iw4LFcyHRYWxaWXdhEVEffIGFQOcP62cxqlO78tlfjeCMPA9Hwxj8t90Wh//K",
        "n+iAeQIDAQABAoIBAAhqQj74zvBg7wnxrW2L8dhTMPigwdycVSx4Aq5KIeeR4/Cgyr5OYnjRittGskjZj3CzyKaX",
        "Iw4LkUScuS7ONHS0mO4M0Hc/Pz+6OehpDhLtkp6Bq1VY0IjzUc/ET2e6vFP2B1i4HNQ4M6inwZDcCKYyLyfIJteT",
        "A4+wWCIP6coC1FEsNTh5lFig0NIW3DD+l/Xa1n/+tNqUv6cltoqe4vPFeYZ2NOEHGQ5FjBjPjR85oNlUz1/uCQSL",
        "s387tLB2urAErtqOHzThlkXDL2to83z6p2FJ82056xu27KJqWSbq7nxFSDjATUIr1iszQZrNiXZPMrXXoVUyjJ9/",
        "TIZMrgMCgYEA7I6ZueYaNdu6rws1jLIduYFpYTraKEg5yNoIEt4RAGK6cIyF1EbI0DsMLUEq9h1F6w1rtPmzrwfK",
        "U7BGI09ynvJVMGWc+iNAzrct964mNWuToL/jFozf+Lh9MVh4W24EksDu78C/qwfvbQM6r/FLnjJFPM5FafCqCz5a",
        "7kkC59MCgYEA1WtYy6ePrxrR0NitNvOdhSsDKqS6WXg0t63S5/OhgGd9e2ebtFCMyYtMQUJcgu0AtAMEB5lj/bk9",
        "RxIrg7BMfbem9qY3Pze7Iul0tg88eJ8BGUM2Pgp7O3F2pyeR0FhDmrzGayMlThvoDamYqXkM07AbsoWpfknL2IXX",
        "NRTUcwMCgYEA1OOw7WBsDjRlWcsYsjpKDfytPdedJct6VYwC4BgB7PrtFwUgG95oMx4w4zlW1I+bsOIvIHvofYjh",
        "SVfGh1ikqu8kQ53vHB5F4MNyFwkfUcwy2+RVFqJJnqlJ4fLgvkfQzdHcNuCcnetSSiUx182sY/6R2Rs51RHFtsCz",
        "TOdgOgkCgYBdTRe9uNxk9fmiLwfSzUAhFsPEoc1iDd4mKtTYWLdTNmsyRwJYGxrhhYdpxERDbK9xAxyA4ftH0fLL",
        "HlNtt+ZI08AndlUSyx+BzMQcT57lMMY/MBYHm3dyblEsFG13ww6TGFI6RlwpwKN7TZiTBnuoFAaXzj1iG4sFdsW1",
        "zAxw1wKBgQDQ/h2H40I6LGJk2GsWBIPtKnumTX/gXWZ1U4/i6EpE6TRkJl7uU5YenuWfKHoaT+1+mJWktK+3Sdhr",
        "pO+mwu4zSyPV7SKJX4vDkTzmIEp1MXnmxeaTE25l0NS0EZm7iCXINu4mKeE7KDPkI+eDl6/J9+ok4QEFI3Z5RMCa",
        "mgH2Mw==",
    );

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Claims {
        sub: String,
        exp: u64,
    }

    fn claims() -> Claims {
        Claims {
            sub: "alice".into(),
            exp: jsonwebtoken::get_current_timestamp() + 60,
        }
    }

    fn accepts(token: &str, key: &DecodingKey, algorithm: Algorithm) -> bool {
        let mut validation = Validation::new(algorithm);
        validation.required_spec_claims.clear();
        decode::<Claims>(token, key, &validation).is_ok()
    }

    fn sign(algorithm: Algorithm, key: &EncodingKey) -> String {
        let _ = RING_PROVIDER.install_default();
        encode(&Header::new(algorithm), &claims(), key).unwrap()
    }

    #[test]
    fn rs256_tokens_verify_against_the_key_sets_modulus_and_exponent() {
        let der = STANDARD.decode(TEST_RSA_KEY).unwrap();
        let token = sign(Algorithm::RS256, &EncodingKey::from_rsa_der(&der));
        let (n, e) = extract_rsa_public_key_components(&der).unwrap();
        let public = DecodingKey::from_rsa_components(
            &URL_SAFE_NO_PAD.encode(&n),
            &URL_SAFE_NO_PAD.encode(&e),
        )
        .unwrap();
        assert!(accepts(&token, &public, Algorithm::RS256));

        let mut tampered = token.clone().into_bytes();
        let at = tampered.len() - 5;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(!accepts(&tampered, &public, Algorithm::RS256));
        // The public key used as an HMAC secret (algorithm confusion) gets nowhere.
        assert!(!accepts(
            &token,
            &DecodingKey::from_secret(&n),
            Algorithm::RS256
        ));
    }

    #[test]
    fn es256_and_hs256_round_trip_and_other_algorithms_are_refused() {
        let rng = SystemRandom::new();
        let pkcs8 = ring_sig::EcdsaKeyPair::generate_pkcs8(
            &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let token = sign(Algorithm::ES256, &EncodingKey::from_ec_der(pkcs8.as_ref()));
        let (_, x, y) =
            extract_ec_public_key_coordinates(pkcs8.as_ref(), Algorithm::ES256).unwrap();
        let public = DecodingKey::from_ec_components(
            &URL_SAFE_NO_PAD.encode(&x),
            &URL_SAFE_NO_PAD.encode(&y),
        )
        .unwrap();
        assert!(accepts(&token, &public, Algorithm::ES256));

        let secret = [7u8; 32];
        let token = sign(Algorithm::HS256, &EncodingKey::from_secret(&secret));
        assert!(accepts(
            &token,
            &DecodingKey::from_secret(&secret),
            Algorithm::HS256
        ));
        assert!(!accepts(
            &token,
            &DecodingKey::from_secret(&[8u8; 32]),
            Algorithm::HS256
        ));

        let _ = RING_PROVIDER.install_default();
        let token = sign(Algorithm::HS512, &EncodingKey::from_secret(&secret));
        assert!(accepts(
            &token,
            &DecodingKey::from_secret(&secret),
            Algorithm::HS512
        ));
        let refused = encode(
            &Header::new(Algorithm::PS256),
            &claims(),
            &EncodingKey::from_rsa_der(&STANDARD.decode(TEST_RSA_KEY).unwrap()),
        );
        assert!(refused.is_err());
        assert_eq!(compute_digest(b"abc", ThumbprintHash::SHA256).len(), 32);
    }
}
