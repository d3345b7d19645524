//! Tests of the CA: generation, loading, leaves, atomic writes.

use super::*;

/// Leaf validity for the tests (the shortest `--certificate-validity`).
const LEAF: Duration = Duration::from_secs(600);
const DAY: Duration = Duration::from_secs(86_400);

fn hosts() -> InterceptHosts {
    InterceptHosts::new(["localhost", "*.example.com", "127.0.0.1"]).unwrap()
}

#[test]
fn generated_ca_is_constrained_and_writes_only_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("ca.crt");
    let settings = CaSettings {
        destination: dest.clone(),
        persisted: None,
        validity: Duration::from_secs(86_400 * 365),
    };
    let ca = CertificateAuthority::init(&settings, &hosts(), LEAF, SystemTime::now()).unwrap();
    let written = fs::read_to_string(&dest).unwrap();
    assert_eq!(written, ca.cert_pem());
    assert_eq!(
        fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let files: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, ["ca.crt"], "no key or temporary file left behind");
    assert!(!written.contains("PRIVATE KEY"));
    let key_pem = ca.issuer.expose_secret().key().serialize_pem();
    let shown = format!("{ca:?}");
    assert!(shown.contains("[REDACTED]"), "{shown}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    let key_body = key_pem.lines().nth(1).unwrap();
    assert!(!shown.contains(key_body), "{shown}");

    let (_, pem) = x509_parser::pem::parse_x509_pem(written.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let nc = cert.name_constraints().unwrap().unwrap().value;
    let permitted = nc.permitted_subtrees.as_ref().unwrap();
    assert_eq!(permitted.len(), 3);
    let shown = format!("{permitted:?}");
    assert!(
        shown.contains("example.com") && shown.contains("localhost"),
        "{shown}"
    );
}

#[test]
fn leaves_carry_the_names_and_chain_to_the_ca() {
    let now = SystemTime::now();
    let ca = CertificateAuthority::generate(&hosts(), Duration::from_secs(3600), now).unwrap();
    let leaf = ca
        .mint_leaf(
            &["a.example.com"],
            &["127.0.0.1".parse().unwrap()],
            Duration::from_secs(86_400),
            now,
        )
        .unwrap();
    assert!(leaf.chain_pem.ends_with(ca.cert_pem()));
    assert!(leaf.key.expose_secret().contains("PRIVATE KEY"));
    assert_eq!(format!("{:?}", leaf.key), "KeyPem([REDACTED])");
    // Never valid beyond the CA.
    assert_eq!(leaf.not_after, ca.not_after());
    let ca_life = ca.not_after().duration_since(now - SEC).unwrap();
    assert!(ca_life <= Duration::from_secs(3601), "{ca_life:?}");
    let first = leaf
        .chain_pem
        .split("-----END CERTIFICATE-----")
        .next()
        .unwrap()
        .to_owned()
        + "-----END CERTIFICATE-----\n";
    let (_, pem) = x509_parser::pem::parse_x509_pem(first.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let sans = format!(
        "{:?}",
        cert.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
    );
    assert!(
        sans.contains("a.example.com") && sans.contains("127, 0, 0, 1"),
        "{sans}"
    );
    assert!(!cert.is_ca());
}

#[test]
fn persisted_ca_is_created_once_then_reused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ca.key");
    let cert = dir.path().join("ca.pem");
    let settings = CaSettings {
        destination: dir.path().join("ca.crt"),
        persisted: Some((key.clone(), cert.clone())),
        validity: Duration::from_secs(86_400),
    };
    let first = CertificateAuthority::init(&settings, &hosts(), LEAF, SystemTime::now()).unwrap();
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let second = CertificateAuthority::init(&settings, &hosts(), LEAF, SystemTime::now()).unwrap();
    assert_eq!(
        first.cert_pem(),
        second.cert_pem(),
        "a restart keeps the CA"
    );
    // A leaf from the reloaded CA still chains to it.
    let leaf = second
        .mint_leaf(
            &["localhost"],
            &[],
            Duration::from_secs(60),
            SystemTime::now(),
        )
        .unwrap();
    assert!(leaf.chain_pem.ends_with(first.cert_pem()));

    fs::remove_file(&key).unwrap();
    let err = CertificateAuthority::init(&settings, &hosts(), LEAF, SystemTime::now()).unwrap_err();
    assert!(err.to_string().contains("must both exist"), "{err}");
    fs::write(&key, "garbage").unwrap();
    let err = CertificateAuthority::init(&settings, &hosts(), LEAF, SystemTime::now()).unwrap_err();
    assert!(err.to_string().contains("unusable"), "{err}");
    // The message names the key file, the one to fix.
    let named = format!(
        "the CA in {} is unusable: the key cannot be read",
        key.display()
    );
    assert!(err.to_string().starts_with(&named), "{err}");
}

#[test]
fn atomic_writes_leave_no_temporary_file_and_replace_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.crt");
    write_atomically(&path, b"first", 0o644).unwrap();
    write_atomically(&path, b"second", 0o644).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"second");
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ca.crt"]);
}

#[test]
fn unwritable_destination_is_a_clear_error() {
    let settings = CaSettings {
        destination: PathBuf::from("/nonexistent-dir/ca.crt"),
        persisted: None,
        validity: Duration::from_secs(3600),
    };
    let err = CertificateAuthority::init(&settings, &hosts(), LEAF, SystemTime::now()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot write /nonexistent-dir/ca.crt"),
        "{err}"
    );
}

/// Writes `ca`'s key and certificate where `init` loads them from.
fn persist(ca: &CertificateAuthority, key: &Path, cert: &Path) {
    fs::write(key, ca.issuer.expose_secret().key().serialize_pem()).unwrap();
    fs::write(cert, ca.cert_pem()).unwrap();
}

#[test]
fn a_loaded_ca_must_outlast_a_leaf_and_cover_the_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ca.key");
    let cert = dir.path().join("ca.pem");
    let settings = CaSettings {
        destination: dir.path().join("ca.crt"),
        persisted: Some((key.clone(), cert.clone())),
        validity: DAY,
    };
    let now = SystemTime::now();
    let refusal = |ca: &CertificateAuthority, hosts: &InterceptHosts, leaf: Duration| {
        persist(ca, &key, &cert);
        match CertificateAuthority::init(&settings, hosts, leaf, now) {
            Ok(_) => None,
            Err(e @ CaError::Refused { .. }) => Some(e.to_string()),
            Err(other) => panic!("not a refusal: {other}"),
        }
    };
    // Created two days ago for one day: expired.
    let expired = CertificateAuthority::generate(&hosts(), DAY, now - 2 * DAY).unwrap();
    let message = refusal(&expired, &hosts(), LEAF).unwrap();
    assert!(
        message.contains(" cannot be used: it expired at "),
        "{message}"
    );
    assert!(message.contains("ca.pem"), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");
    // Ends in an hour: fine for 10-minute leaves, not for one-day leaves.
    let ending = CertificateAuthority::generate(&hosts(), DAY, now - DAY + 3600 * SEC).unwrap();
    assert_eq!(refusal(&ending, &hosts(), LEAF), None);
    let message = refusal(&ending, &hosts(), DAY).unwrap();
    assert!(
        message.contains("sooner than --certificate-validity (1day) from now"),
        "{message}"
    );
    // A CA constrained to other hosts; then one without name constraints,
    // which permits any host.
    let other = InterceptHosts::new(["other.test"]).unwrap();
    let constrained = CertificateAuthority::generate(&other, DAY, now).unwrap();
    let message = refusal(&constrained, &hosts(), LEAF).unwrap();
    assert!(
        message.contains(
            "its name constraints do not permit --intercept-host localhost, *.example.com;"
        ),
        "{message}"
    );
    assert_eq!(refusal(&constrained, &other, LEAF), None);
    // (That CA has no IP constraint, so IP addresses are not limited.)
    let with_ip = InterceptHosts::new(["other.test", "10.1.2.3"]).unwrap();
    assert_eq!(refusal(&constrained, &with_ip, LEAF), None);
    let unconstrained =
        CertificateAuthority::generate(&InterceptHosts::default(), DAY, now).unwrap();
    assert_eq!(refusal(&unconstrained, &hosts(), LEAF), None);
}

#[test]
fn the_constraints_read_back_are_the_ones_generated() {
    let now = SystemTime::now();
    let ca = CertificateAuthority::generate(&hosts(), DAY, now).unwrap();
    let facts = check::read(ca.cert_pem()).unwrap();
    assert_eq!(facts.not_after, ca.not_after());
    assert!(facts.not_before < now);
    assert_eq!(
        facts.limits.permitted_dns,
        Some(vec!["localhost".to_owned(), "example.com".to_owned()])
    );
    assert!(check::usable(&facts, &hosts(), LEAF, now).is_ok());
    let more = InterceptHosts::new(["localhost", "127.0.0.2", "a.b.example.com"]).unwrap();
    assert_eq!(
        check::usable(&facts, &more, LEAF, now).unwrap_err(),
        "its name constraints do not permit --intercept-host 127.0.0.2"
    );
}

#[test]
fn an_expired_ca_signs_nothing() {
    let now = SystemTime::now();
    let ca = CertificateAuthority::generate(&hosts(), 60 * SEC, now).unwrap();
    assert!(ca.mint_leaf(&["localhost"], &[], LEAF, now).is_ok());
    let err = ca
        .mint_leaf(&["localhost"], &[], LEAF, now + 60 * SEC)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with("the interception CA expired at "),
        "{err}"
    );
}

const SEC: Duration = Duration::from_secs(1);
