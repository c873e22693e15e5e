//! X25519MLKEM768, the hybrid post-quantum key exchange of
//! draft-ietf-tls-ecdhe-mlkem (TLS NamedGroup 0x11EC), as a rustls key
//! exchange group on top of the ring provider.
//!
//! Why it exists: a recording of today's mesh traffic must stay secret even
//! if a quantum computer breaks X25519 later ("harvest now, decrypt later").
//! The hybrid is at least as strong as the stronger of its halves, so nothing
//! is lost if ML-KEM turns out weaker than hoped. rustls ships this group only
//! with its aws-lc-rs provider; docs/DESIGN.md ("Post-quantum key exchange")
//! says why this crate keeps ring and adds the pure-Rust `ml-kem` crate.
//!
//! Wire format (draft-ietf-tls-ecdhe-mlkem, section 3):
//! - client share: ML-KEM-768 encapsulation key (1184 bytes) || X25519 public key (32 bytes);
//! - server share: ML-KEM-768 ciphertext (1088 bytes) || X25519 public key (32 bytes);
//! - shared secret: ML-KEM shared secret (32 bytes) || X25519 shared secret (32 bytes).
//!
//! The X25519 half is rustls' own ring X25519 group, so it is checked exactly
//! as a plain X25519 exchange is. The client also offers that half on its own
//! (`hybrid_component`), so a server without the hybrid picks X25519 from the
//! same ClientHello, with no extra round trip.
//!
//! This file depends on rustls, ring, ml-kem and zeroize only, so that the
//! comparison program in `benches/kx-compare` can check it against rustls'
//! aws-lc-rs implementation.

use ml_kem::kem::{Decapsulate, DecapsulationKey, EncapsulationKey};
use ml_kem::{
    Ciphertext, EncapsulateDeterministic, EncodedSizeUser, KemCore, MlKem768, MlKem768Params, B32,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::crypto::ring::kx_group::X25519;
use rustls::crypto::{
    ActiveKeyExchange, CompletedKeyExchange, GetRandomFailed, SharedSecret, SupportedKxGroup,
};
use rustls::ffdhe_groups::FfdheGroup;
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};
use zeroize::Zeroize;

/// The hybrid group, to put in a `CryptoProvider`'s `kx_groups`. Put
/// `X25519` after it too, so that its half can be offered on its own.
pub static X25519MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768;

/// Length of an ML-KEM-768 encapsulation key (FIPS 203, table 3).
pub const MLKEM768_ENCAPSULATION_KEY_LEN: usize = 1184;
/// Length of an ML-KEM-768 ciphertext (FIPS 203, table 3).
pub const MLKEM768_CIPHERTEXT_LEN: usize = 1088;
const X25519_LEN: usize = 32;
/// The ML-KEM modulus q: every coefficient of an encapsulation key is below it.
const Q: u16 = 3329;

#[derive(Debug)]
struct X25519MlKem768;

impl SupportedKxGroup for X25519MlKem768 {
    /// Client side: a fresh ML-KEM key pair and a fresh X25519 key pair.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let classical = X25519.start()?;
        let (decapsulation, encapsulation) = key_pair()?;
        let mut share = Vec::with_capacity(MLKEM768_ENCAPSULATION_KEY_LEN + X25519_LEN);
        share.extend_from_slice(&encapsulation.as_bytes());
        share.extend_from_slice(classical.pub_key());
        Ok(Box::new(Active {
            decapsulation,
            classical,
            share,
        }))
    }

    /// Server side: encapsulate to the client's ML-KEM key and finish the
    /// X25519 half, in one step (the ciphertext depends on the client's key).
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != MLKEM768_ENCAPSULATION_KEY_LEN + X25519_LEN {
            return Err(invalid_share());
        }
        let (key, classical_share) = client_share.split_at(MLKEM768_ENCAPSULATION_KEY_LEN);
        if !encapsulation_key_is_canonical(key) {
            return Err(invalid_share());
        }
        let key = EncapsulationKey::<MlKem768Params>::from_bytes(
            &key.try_into().map_err(|_| invalid_share())?,
        );
        let mut seed = B32::default();
        fill_random(&mut seed)?;
        let encapsulated = key.encapsulate_deterministic(&seed);
        seed.zeroize();
        let (ciphertext, mut pq_secret) = encapsulated.map_err(|()| invalid_share())?;
        let classical = X25519.start_and_complete(classical_share)?;
        let mut share = Vec::with_capacity(MLKEM768_CIPHERTEXT_LEN + X25519_LEN);
        share.extend_from_slice(&ciphertext);
        share.extend_from_slice(&classical.pub_key);
        let secret = combine(&pq_secret, classical.secret.secret_bytes());
        pq_secret.zeroize();
        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519MLKEM768,
            pub_key: share,
            secret,
        })
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    /// The draft defines the group for TLS 1.3 only.
    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// A client's exchange in progress: the ML-KEM decapsulation key (zeroized
/// on drop by ml-kem) and the X25519 half.
struct Active {
    decapsulation: DecapsulationKey<MlKem768Params>,
    classical: Box<dyn ActiveKeyExchange>,
    share: Vec<u8>,
}

impl ActiveKeyExchange for Active {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        if server_share.len() != MLKEM768_CIPHERTEXT_LEN + X25519_LEN {
            return Err(invalid_share());
        }
        let (ciphertext, classical_share) = server_share.split_at(MLKEM768_CIPHERTEXT_LEN);
        let ciphertext =
            Ciphertext::<MlKem768>::try_from(ciphertext).map_err(|_| invalid_share())?;
        let mut pq_secret = self
            .decapsulation
            .decapsulate(&ciphertext)
            .map_err(|()| invalid_share())?;
        let classical = self.classical.complete(classical_share)?;
        let secret = combine(&pq_secret, classical.secret_bytes());
        pq_secret.zeroize();
        Ok(secret)
    }

    /// The X25519 half, which rustls offers as a key share of its own.
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((self.classical.group(), self.classical.pub_key()))
    }

    /// The server chose plain X25519: finish that half alone.
    fn complete_hybrid_component(
        self: Box<Self>,
        server_share: &[u8],
    ) -> Result<SharedSecret, Error> {
        self.classical.complete(server_share)
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

/// A fresh ML-KEM-768 key pair. The seeds come from the system RNG through
/// ring, so a failing RNG is an error here rather than a panic inside ml-kem.
fn key_pair() -> Result<
    (
        DecapsulationKey<MlKem768Params>,
        EncapsulationKey<MlKem768Params>,
    ),
    Error,
> {
    let mut d = B32::default();
    let mut z = B32::default();
    fill_random(&mut d)?;
    fill_random(&mut z)?;
    let pair = MlKem768::generate_deterministic(&d, &z);
    d.zeroize();
    z.zeroize();
    Ok(pair)
}

fn fill_random(bytes: &mut [u8]) -> Result<(), Error> {
    SystemRandom::new()
        .fill(bytes)
        .map_err(|_| GetRandomFailed.into())
}

/// The hybrid shared secret: ML-KEM's first, then X25519's.
fn combine(pq: &[u8], classical: &[u8]) -> SharedSecret {
    let mut secret = Vec::with_capacity(pq.len() + classical.len());
    secret.extend_from_slice(pq);
    secret.extend_from_slice(classical);
    SharedSecret::from(secret)
}

/// The encapsulation key check of FIPS 203 (section 7.2, "modulus check"),
/// which the draft requires of the server: the key's 12-bit coefficients
/// (the 1152 bytes before the 32-byte seed) must all be below q, so
/// decoding and re-encoding gives the same bytes.
fn encapsulation_key_is_canonical(key: &[u8]) -> bool {
    let Some(coefficients) = key.len().checked_sub(32).map(|n| &key[..n]) else {
        return false;
    };
    coefficients.len() % 3 == 0
        && coefficients.chunks_exact(3).all(|b| {
            let low = u16::from(b[0]) | (u16::from(b[1] & 0x0f) << 8);
            let high = u16::from(b[1] >> 4) | (u16::from(b[2]) << 4);
            low < Q && high < Q
        })
}

fn invalid_share() -> Error {
    Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare)
}

#[cfg(test)]
mod tests;
