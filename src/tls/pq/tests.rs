//! The hybrid group against itself, against its parts (ml-kem and rustls'
//! X25519 used directly, to pin the draft's byte layout), and against
//! malformed shares.

use ml_kem::kem::{Encapsulate, EncapsulationKey};
use ml_kem::{EncodedSizeUser, MlKem768Params};

use super::*;

const CLIENT_SHARE_LEN: usize = MLKEM768_ENCAPSULATION_KEY_LEN + 32;
const SERVER_SHARE_LEN: usize = MLKEM768_CIPHERTEXT_LEN + 32;

fn is_invalid_share(e: &Error) -> bool {
    matches!(e, Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare))
}

#[test]
fn client_and_server_agree_on_a_64_byte_secret() {
    let client = X25519MLKEM768.start().unwrap();
    assert_eq!(client.group(), NamedGroup::X25519MLKEM768);
    assert_eq!(client.pub_key().len(), CLIENT_SHARE_LEN);
    let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
    assert_eq!(server.group, NamedGroup::X25519MLKEM768);
    assert_eq!(server.pub_key.len(), SERVER_SHARE_LEN);
    let secret = client.complete(&server.pub_key).unwrap();
    assert_eq!(secret.secret_bytes().len(), 64);
    assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
}

#[test]
fn two_exchanges_share_nothing() {
    let a = X25519MLKEM768.start().unwrap();
    let b = X25519MLKEM768.start().unwrap();
    assert_ne!(a.pub_key(), b.pub_key());
    let sa = X25519MLKEM768.start_and_complete(a.pub_key()).unwrap();
    let sb = X25519MLKEM768.start_and_complete(a.pub_key()).unwrap();
    assert_ne!(sa.pub_key, sb.pub_key, "fresh encapsulation and X25519 key");
    assert_ne!(sa.secret.secret_bytes(), sb.secret.secret_bytes());
}

/// The layout of draft-ietf-tls-ecdhe-mlkem, built from the parts by hand:
/// the client's share is the ML-KEM key then the X25519 key, the server's is
/// the ciphertext then its X25519 key, and the secret is ML-KEM's then X25519's.
#[test]
fn byte_layout_follows_the_draft() {
    let client = X25519MLKEM768.start().unwrap();
    let (key, x25519_public) = client.pub_key().split_at(MLKEM768_ENCAPSULATION_KEY_LEN);
    assert_eq!(
        client.hybrid_component(),
        Some((NamedGroup::X25519, x25519_public))
    );
    let key = EncapsulationKey::<MlKem768Params>::from_bytes(&key.try_into().unwrap());
    let (ciphertext, pq_secret) = key.encapsulate(&mut rand::rngs::OsRng).unwrap();
    let classical = X25519.start_and_complete(x25519_public).unwrap();
    let mut server_share = ciphertext.to_vec();
    server_share.extend_from_slice(&classical.pub_key);

    let secret = client.complete(&server_share).unwrap();
    let mut want = pq_secret.to_vec();
    want.extend_from_slice(classical.secret.secret_bytes());
    assert_eq!(secret.secret_bytes(), want.as_slice());
}

/// A server without the hybrid answers the X25519 half on its own.
#[test]
fn classical_half_completes_alone() {
    let client = X25519MLKEM768.start().unwrap();
    let (group, share) = client.hybrid_component().unwrap();
    assert_eq!(group, NamedGroup::X25519);
    let server = X25519.start_and_complete(share).unwrap();
    let secret = client.complete_hybrid_component(&server.pub_key).unwrap();
    assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
    assert_eq!(secret.secret_bytes().len(), 32);
}

/// Changing either half of the server's share changes the client's secret
/// (ML-KEM rejects implicitly: a wrong ciphertext yields an unrelated key),
/// so both halves take part.
#[test]
fn both_halves_feed_the_secret() {
    for flip in [0, MLKEM768_CIPHERTEXT_LEN + 5] {
        let client = X25519MLKEM768.start().unwrap();
        let mut server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
        server.pub_key[flip] ^= 0x01;
        let secret = client.complete(&server.pub_key);
        if let Ok(secret) = secret {
            assert_ne!(
                secret.secret_bytes(),
                server.secret.secret_bytes(),
                "byte {flip} changed"
            );
        }
    }
}

#[test]
fn shares_of_the_wrong_length_are_refused() {
    let client = X25519MLKEM768.start().unwrap();
    let share = client.pub_key().to_vec();
    for bad in [&share[..CLIENT_SHARE_LEN - 1], &[][..], &share[..32]] {
        let err = X25519MLKEM768.start_and_complete(bad).err().unwrap();
        assert!(is_invalid_share(&err), "{err:?}");
    }
    let mut long = share.clone();
    long.push(0);
    assert!(is_invalid_share(
        &X25519MLKEM768.start_and_complete(&long).err().unwrap()
    ));

    let server = X25519MLKEM768.start_and_complete(&share).unwrap();
    let short = &server.pub_key[..SERVER_SHARE_LEN - 1];
    assert!(is_invalid_share(&client.complete(short).err().unwrap()));
}

/// FIPS 203's modulus check: a coefficient of q or more in the client's key
/// is refused, not silently reduced.
#[test]
fn non_canonical_encapsulation_key_is_refused() {
    let client = X25519MLKEM768.start().unwrap();
    assert!(encapsulation_key_is_canonical(
        &client.pub_key()[..MLKEM768_ENCAPSULATION_KEY_LEN]
    ));
    // The first coefficient is byte 0 plus the low nibble of byte 1.
    for (b0, b1_low) in [(0xff_u8, 0x0f_u8), (0x01, 0x0d)] {
        let mut share = client.pub_key().to_vec();
        share[0] = b0;
        share[1] = (share[1] & 0xf0) | b1_low;
        assert!(!encapsulation_key_is_canonical(
            &share[..MLKEM768_ENCAPSULATION_KEY_LEN]
        ));
        let err = X25519MLKEM768.start_and_complete(&share).err().unwrap();
        assert!(is_invalid_share(&err), "{err:?}");
    }
    // q - 1 = 3328 = 0xd00 is the largest coefficient allowed.
    let mut share = client.pub_key().to_vec();
    share[0] = 0x00;
    share[1] = (share[1] & 0xf0) | 0x0d;
    assert!(encapsulation_key_is_canonical(
        &share[..MLKEM768_ENCAPSULATION_KEY_LEN]
    ));
    // The second coefficient: high nibble of byte 1 and byte 2.
    let mut share = client.pub_key().to_vec();
    share[1] |= 0xf0;
    share[2] = 0xff;
    assert!(!encapsulation_key_is_canonical(
        &share[..MLKEM768_ENCAPSULATION_KEY_LEN]
    ));
}

#[test]
fn an_all_zero_x25519_half_is_refused() {
    let client = X25519MLKEM768.start().unwrap();
    let mut share = client.pub_key().to_vec();
    share[MLKEM768_ENCAPSULATION_KEY_LEN..].fill(0);
    assert!(X25519MLKEM768.start_and_complete(&share).is_err());
}

#[test]
fn offered_for_tls13_only() {
    assert!(X25519MLKEM768.usable_for_version(ProtocolVersion::TLSv1_3));
    assert!(!X25519MLKEM768.usable_for_version(ProtocolVersion::TLSv1_2));
    assert_eq!(X25519MLKEM768.name(), NamedGroup::X25519MLKEM768);
    assert_eq!(u16::from(X25519MLKEM768.name()), 0x11ec);
}
