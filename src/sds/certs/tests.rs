//! Tests of the leaf store: which names are minted, normalisation and
//! slots, signing off the runtime, rotation.

use super::*;

use super::test_store as store;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;

/// Holds `name` and returns its current leaf.
async fn leaf(certs: &Certificates, name: &str) -> Result<Arc<Minted>, Refusal> {
    let slot = certs.hold(name)?;
    certs.get(&slot).await
}

fn secret_of(any: &Any) -> (String, TlsCertificate) {
    let secret = Secret::decode(any.value.as_slice()).unwrap();
    let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
        panic!("not a TLS certificate")
    };
    (secret.name, tls)
}

#[tokio::test]
async fn mints_only_intercepted_names_and_caches_them() {
    let certs = store(10);
    let a = leaf(&certs, "a.example.com").await.unwrap();
    assert!(Arc::ptr_eq(
        &a,
        &leaf(&certs, "a.example.com").await.unwrap()
    ));
    assert_eq!(certs.counters.minted.load(Ordering::Relaxed), 1);
    assert!(leaf(&certs, "127.0.0.1").await.is_ok());
    assert!(leaf(&certs, NO_SNI_SECRET).await.is_ok());
    for (name, refusal) in [
        ("example.com", Refusal::NotIntercepted),
        ("evil.test", Refusal::NotIntercepted),
        ("10.0.0.1", Refusal::NotIntercepted),
        ("not a name", Refusal::InvalidName),
    ] {
        assert_eq!(certs.hold(name).err(), Some(refusal), "{name}");
    }
    assert_eq!(certs.counters.refused.load(Ordering::Relaxed), 4);

    // Debug shows the version, never the key: neither the PEM text nor the
    // encoded secret's bytes.
    let shown = format!("{a:?}");
    assert!(
        shown.contains(&format!("version: \"{}\"", a.version)),
        "{shown}"
    );
    let (name, tls) = secret_of(&a.any("a.example.com"));
    assert_eq!(name, "a.example.com");
    let Some(Specifier::InlineBytes(key)) = tls.private_key.unwrap().specifier else {
        panic!("no inline key")
    };
    let key = String::from_utf8(key).unwrap();
    assert!(key.contains("PRIVATE KEY"));
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(!shown.contains(key.lines().nth(1).unwrap()), "{shown}");
    let value = format!("{:?}", a.any("a.example.com").value);
    assert!(!shown.contains(&value[1..40]), "{shown}");
}

#[tokio::test]
async fn case_variants_share_one_leaf_and_one_slot_but_keep_their_names() {
    let certs = store(1);
    let variants = [
        "a.example.com",
        "A.Example.COM",
        "a.example.com.",
        "A.EXAMPLE.COM.",
    ];
    let slots: Vec<Slot<'_>> = variants
        .iter()
        .map(|name| certs.hold(name).expect("the one slot is shared"))
        .collect();
    assert!(slots.iter().all(|slot| slot.key() == "a.example.com"));
    assert_eq!(certs.hold("b.example.com").err(), Some(Refusal::TooMany));
    let first = certs.get(&slots[0]).await.unwrap();
    for (name, slot) in variants.iter().zip(&slots) {
        let minted = certs.get(slot).await.unwrap();
        assert!(Arc::ptr_eq(&minted, &first), "{name}: one leaf");
        // Envoy matches a secret by the name it asked for.
        assert_eq!(minted.resource(name).name, *name);
        assert_eq!(secret_of(&minted.any(name)).0, *name);
        assert_eq!(secret_of(&minted.any(name)).1, *first.tls.expose_secret());
    }
    assert_eq!(certs.counters.minted.load(Ordering::Relaxed), 1);
    // The slot is freed when its last holder goes.
    drop(slots);
    let ip = certs.hold("127.0.0.1").unwrap();
    let bracketed = certs.hold("[127.0.0.1]").unwrap();
    assert_eq!((ip.key(), bracketed.key()), ("127.0.0.1", "127.0.0.1"));
    drop((ip, bracketed));
    // Invalid names are refused as before, whatever their case.
    for name in ["a..example.com", "a.example.com..", "", "A.EXAMPLE.COM:443"] {
        assert_eq!(certs.hold(name).err(), Some(Refusal::InvalidName), "{name}");
    }
    assert!(certs.hold("b.example.com").is_ok());
}

/// A hook that reports the signing thread once, then holds the signer
/// until released (bounded, so a broken build fails rather than hangs).
fn held_signer() -> (
    SignHook,
    tokio::sync::oneshot::Receiver<std::thread::ThreadId>,
    std::sync::mpsc::Sender<()>,
) {
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
    let entered_tx = std::sync::Mutex::new(Some(entered_tx));
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let hook: SignHook = Arc::new(move |_name| {
        if let Some(tx) = entered_tx.lock().unwrap().take() {
            let _ = tx.send(std::thread::current().id());
        }
        let _ = release_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10));
    });
    (hook, entered_rx, release_tx)
}

const DEADLINE: Duration = Duration::from_secs(10);

// A current-thread runtime: the test's own thread is the only worker, so
// a mint that ran on the runtime would block everything below.
#[tokio::test(flavor = "current_thread")]
async fn signing_runs_off_the_runtime_and_is_shared_per_name() {
    let mut certs = store(10);
    let (hook, entered, release) = held_signer();
    certs.before_sign = Some(hook);
    let certs = Arc::new(certs);
    let runtime_thread = std::thread::current().id();

    let first = tokio::spawn({
        let certs = certs.clone();
        async move { leaf(&certs, "a.example.com").await }
    });
    let signer_thread = tokio::time::timeout(DEADLINE, entered)
        .await
        .expect("signing started")
        .unwrap();
    assert_ne!(signer_thread, runtime_thread, "signing is off the runtime");

    // While the signer is held: a second caller for the same name (in
    // another case) joins the mint in flight, and the runtime still runs
    // other work (a name refused without signing, another task).
    let second = tokio::spawn({
        let certs = certs.clone();
        async move { leaf(&certs, "A.example.com").await }
    });
    assert_eq!(
        tokio::time::timeout(DEADLINE, leaf(&certs, "evil.test"))
            .await
            .expect("the runtime answers while a mint is held")
            .unwrap_err(),
        Refusal::NotIntercepted
    );
    let other = tokio::spawn(async { "answered" });
    assert_eq!(
        tokio::time::timeout(DEADLINE, other)
            .await
            .expect("other tasks run while a mint is held")
            .unwrap(),
        "answered"
    );
    assert!(!first.is_finished());

    release.send(()).unwrap();
    let first = tokio::time::timeout(DEADLINE, first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(DEADLINE, second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(certs.counters.minted.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_panicking_signer_is_a_refusal() {
    let mut certs = store(10);
    certs.signers = Arc::new(Semaphore::new(1));
    certs.before_sign = Some(Arc::new(|name| {
        assert_ne!(name, "boom.example.com", "a deliberate signing panic");
    }));
    assert_eq!(
        leaf(&certs, "boom.example.com").await.unwrap_err(),
        Refusal::Mint("the signing task panicked".into())
    );
    assert_eq!(certs.counters.refused.load(Ordering::Relaxed), 1);
    // The one signing permit came back, and the failure was not cached.
    assert!(leaf(&certs, "ok.example.com").await.is_ok());
    certs.before_sign = None;
    assert!(leaf(&certs, "boom.example.com").await.is_ok());
    assert_eq!(certs.counters.minted.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn sni_less_secret_needs_an_ip() {
    let hosts = InterceptHosts::new(["localhost"]).unwrap();
    let ca = CertificateAuthority::generate(&hosts, Duration::from_secs(3600), SystemTime::now())
        .unwrap();
    let certs = Certificates::new(ca, hosts, Duration::from_secs(600), 10);
    assert_eq!(certs.hold(NO_SNI_SECRET).err(), Some(Refusal::NoSniNoIps));
}

#[tokio::test(start_paused = true)]
async fn rotates_after_two_thirds_of_the_validity() {
    let certs = store(10);
    let first = leaf(&certs, "localhost").await.unwrap();
    tokio::time::advance(Duration::from_secs(86_400 * 2 / 3 - 60)).await;
    assert_eq!(
        leaf(&certs, "localhost").await.unwrap().version,
        first.version
    );
    tokio::time::advance(Duration::from_secs(120)).await;
    let second = leaf(&certs, "localhost").await.unwrap();
    assert_ne!(second.version, first.version);
    assert!(second.rotate_at > first.rotate_at);
}

#[test]
fn rotation_is_never_sooner_than_the_minimum() {
    let hour = Duration::from_secs(3600);
    assert_eq!(rotation_delay(24 * hour), 16 * hour);
    assert_eq!(
        rotation_delay(Duration::from_secs(600)),
        Duration::from_secs(400)
    );
    for short in [
        Duration::ZERO,
        Duration::from_secs(1),
        Duration::from_secs(90),
    ] {
        assert_eq!(rotation_delay(short), MIN_ROTATION, "{short:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_ca_near_its_end_cuts_leaves_short_but_not_their_rotation() {
    let now = SystemTime::now();
    let certs = ending_store(10, now + Duration::from_secs(5));
    let minted = leaf(&certs, "localhost").await.unwrap();
    assert!(
        minted.rotate_at >= Instant::now() + MIN_ROTATION,
        "the successor is not due at once"
    );
    let (_, tls) = secret_of(&minted.any("localhost"));
    let Some(Specifier::InlineBytes(chain)) = tls.certificate_chain.unwrap().specifier else {
        panic!("no inline chain")
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&chain).unwrap();
    let cert = pem.parse_x509().unwrap();
    let not_after = cert.validity().not_after.timestamp();
    let ca_end = certs
        .ca
        .not_after()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    assert_eq!(
        u64::try_from(not_after).unwrap(),
        ca_end.as_secs(),
        "the leaf ends with its CA"
    );
}

#[tokio::test]
async fn an_expired_ca_mints_nothing() {
    let certs = ending_store(10, SystemTime::now() - Duration::from_secs(1));
    let refusal = leaf(&certs, "localhost").await.unwrap_err();
    let Refusal::Mint(reason) = refusal else {
        panic!("{refusal:?}")
    };
    assert!(
        reason.starts_with("the interception CA expired at "),
        "{reason}"
    );
    assert_eq!(certs.counters.minted.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn slots_are_bounded_and_released() {
    let certs = store(2);
    let a = certs.hold("a.example.com").unwrap();
    let _b = certs.hold("b.example.com").unwrap();
    assert_eq!(certs.hold("c.example.com").err(), Some(Refusal::TooMany));
    let a_again = certs.hold("A.example.com").unwrap();
    drop(a);
    assert_eq!(
        certs.hold("c.example.com").err(),
        Some(Refusal::TooMany),
        "a.example.com is still held once"
    );
    drop(a_again);
    assert!(certs.hold("c.example.com").is_ok());
}

#[tokio::test]
async fn only_held_names_stay_cached() {
    let certs = store(1);
    let first = leaf(&certs, "a.example.com").await.unwrap();
    // Released (leaf() dropped its slot): the next mint forgets it.
    assert!(leaf(&certs, "b.example.com").await.is_ok());
    assert!(!certs.cache.contains_key("a.example.com"));
    assert!(certs.cache.contains_key("b.example.com"));
    let again = leaf(&certs, "A.example.com").await.unwrap();
    assert_ne!(again.version, first.version, "minted anew");
    assert_eq!(certs.counters.minted.load(Ordering::Relaxed), 3);
    // A name held throughout keeps its leaf across others coming and going.
    let held = certs.hold("a.example.com").unwrap();
    let kept = certs.get(&held).await.unwrap();
    assert_eq!(certs.hold("b.example.com").err(), Some(Refusal::TooMany));
    drop(certs.hold("A.EXAMPLE.COM").unwrap());
    assert!(Arc::ptr_eq(&kept, &certs.get(&held).await.unwrap()));
}

/// `n` distinct spellings of `base` (upper-case letters picked by the bits
/// of `i`), the first being `base` itself.
fn spellings(base: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut letter = 0;
            base.chars()
                .map(|c| {
                    if !c.is_ascii_alphabetic() {
                        return c;
                    }
                    letter += 1;
                    if i >> (letter - 1) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn spellings_of_held_names_are_bounded_like_a_full_cache() {
    let certs = store(1);
    let bound = 1 + slots::max_variants(1);
    let names = spellings("a.example.com", bound + 1);
    let (admitted, over) = names.split_at(bound);
    let mut slots: Vec<Slot<'_>> = admitted
        .iter()
        .map(|name| certs.hold(name).expect("within the bound"))
        .collect();
    for slot in &slots {
        certs.get(slot).await.unwrap();
    }
    assert_eq!(certs.counters.minted.load(Ordering::Relaxed), 1, "one leaf");
    // One more spelling is refused, as a new name is when the slots are
    // taken; a spelling held already is not.
    assert_eq!(certs.hold(&over[0]).err(), Some(Refusal::TooManyVariants));
    assert_eq!(certs.hold("b.example.com").err(), Some(Refusal::TooMany));
    assert!(certs.hold(&admitted[7]).is_ok());
    assert_eq!(certs.counters.refused.load(Ordering::Relaxed), 2);
    // A spelling whose last holder went makes room for another.
    slots.pop();
    let other = certs.hold(&over[0]).unwrap();
    assert_eq!(other.key(), "a.example.com");
    assert!(Arc::ptr_eq(
        &certs.get(&other).await.unwrap(),
        &certs.get(&slots[0]).await.unwrap()
    ));
}
