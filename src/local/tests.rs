//! The classifier, by table. This is the only place link-local and cloud
//! metadata addresses appear: nothing here sends traffic anywhere.

use super::*;

use LocalKind::{LinkLocal, Loopback, LoopbackName, Metadata, Unspecified};

/// `:authority` -> expected outcome (`None`: not local, forwarded).
const AUTHORITIES: &[(&str, Option<LocalKind>)] = &[
    // IPv4 loopback, the whole /8, with and without a port.
    ("127.0.0.1", Some(Loopback)),
    ("127.0.0.1:9901", Some(Loopback)),
    ("127.1.2.3:80", Some(Loopback)),
    ("127.255.255.255", Some(Loopback)),
    ("[127.0.0.1]:80", Some(Loopback)),
    // 0.0.0.0/8: Linux connects 0.0.0.0 to this machine.
    ("0.0.0.0", Some(Unspecified)),
    ("0.0.0.0:18080", Some(Unspecified)),
    ("0.1.2.3", Some(Unspecified)),
    // Link-local, the metadata address among them.
    ("169.254.169.254", Some(LinkLocal)),
    ("169.254.169.254:80", Some(LinkLocal)),
    ("169.254.0.1", Some(LinkLocal)),
    ("169.254.255.255:443", Some(LinkLocal)),
    // IPv6.
    ("[::1]", Some(Loopback)),
    ("[::1]:8080", Some(Loopback)),
    ("::1", Some(Loopback)),
    ("[0:0:0:0:0:0:0:1]:80", Some(Loopback)),
    ("[::]:80", Some(Unspecified)),
    ("[fe80::1]:80", Some(LinkLocal)),
    ("[FE80::abcd]", Some(LinkLocal)),
    ("[febf:ffff::1]", Some(LinkLocal)),
    ("[fd00:ec2::254]:80", Some(Metadata)),
    // IPv4-mapped and IPv4-compatible forms read as their IPv4 address.
    ("[::ffff:127.0.0.1]:80", Some(Loopback)),
    ("[::ffff:7f00:1]", Some(Loopback)),
    ("[0:0:0:0:0:ffff:7f00:0001]", Some(Loopback)),
    ("[::ffff:169.254.169.254]", Some(LinkLocal)),
    ("[::ffff:a9fe:a9fe]:80", Some(LinkLocal)),
    ("[::ffff:0.0.0.0]", Some(Unspecified)),
    ("[::127.0.0.1]:80", Some(Loopback)),
    ("[::169.254.169.254]", Some(LinkLocal)),
    ("[::2:1]", Some(Unspecified)), // ::0.2.0.1
    // inet_aton forms that getaddrinfo turns into 127.0.0.1 and friends.
    ("127.1", Some(Loopback)),
    ("127.1:9901", Some(Loopback)),
    ("127.0.1", Some(Loopback)),
    ("0x7f.1", Some(Loopback)),
    ("0X7F.0.0.1", Some(Loopback)),
    ("0x7f000001", Some(Loopback)),
    ("2130706433", Some(Loopback)),
    ("2130706433:18080", Some(Loopback)),
    ("017700000001", Some(Loopback)),
    ("0177.0.0.1", Some(Loopback)),
    ("0177.0.0.01", Some(Loopback)),
    ("127.000.000.001", Some(Loopback)),
    ("127.0.0.1.", Some(Loopback)),
    ("0", Some(Unspecified)),
    ("0:80", Some(Unspecified)),
    ("0x", Some(Unspecified)),
    ("00", Some(Unspecified)),
    ("2852039166", Some(LinkLocal)),
    ("0xa9fea9fe", Some(LinkLocal)),
    ("169.16689662", Some(LinkLocal)),
    ("0251.0376.0251.0376", Some(LinkLocal)),
    // Names of this machine: case-insensitive, trailing dot ignored.
    ("localhost", Some(LoopbackName)),
    ("localhost:8080", Some(LoopbackName)),
    ("LOCALHOST", Some(LoopbackName)),
    ("LocalHost.:80", Some(LoopbackName)),
    ("api.localhost", Some(LoopbackName)),
    ("a.b.LOCALHOST.", Some(LoopbackName)),
    ("ip6-localhost", Some(LoopbackName)),
    ("ip6-loopback:80", Some(LoopbackName)),
    ("localhost.localdomain", Some(LoopbackName)),
    ("localhost4", Some(LoopbackName)),
    ("localhost6.localdomain6", Some(LoopbackName)),
    // Cloud metadata names.
    ("metadata.google.internal", Some(Metadata)),
    ("Metadata.Google.Internal.:80", Some(Metadata)),
    ("metadata.goog", Some(Metadata)),
    ("100.100.100.200", Some(Metadata)),
    // Remote destinations.
    ("example.com", None),
    ("example.com:443", None),
    ("node-exporter.monitoring.svc:9100", None),
    ("10.0.0.1", None),
    ("192.168.1.1:80", None),
    ("8.8.8.8", None),
    ("126.255.255.255", None),
    ("128.0.0.1", None),
    ("1.0.0.0", None),
    ("169.253.255.255", None),
    ("169.255.0.1", None),
    ("100.100.100.201", None),
    ("[2001:db8::1]:443", None),
    ("[fec0::1]", None),
    ("[fe7f::1]", None),
    ("[fc00::1]", None),
    ("[::ffff:10.0.0.1]", None),
    ("[::1:0:0:1]", None),
    ("localhost.example.com", None),
    ("notlocalhost", None),
    ("localhostx", None),
    ("mylocalhost.test", None),
    ("metadata", None),
    ("metadata.google.internal.example", None),
    ("10.1", None),
    ("0x0a000001", None),
    ("167772161", None),
    // Not inet_aton numbers (glibc refuses them), so plain names.
    ("127.08", None),
    ("0x7g.1", None),
    ("4294967296", None),
    ("127.16777216", None),
    ("127.256.1", None),
    ("1.2.3.4.5", None),
    ("99999999999999999999999", None),
];

#[test]
fn classifies_every_form() {
    for (authority, expected) in AUTHORITIES {
        let got = match check_authority(authority.as_bytes()) {
            Ok(()) => None,
            Err(LocalRefusal::Local { kind, .. }) => Some(kind),
            Err(refusal @ LocalRefusal::Unreadable { .. }) => {
                panic!("{authority:?} should be readable: {refusal}")
            }
        };
        assert_eq!(got, *expected, "{authority:?}");
    }
}

#[test]
fn an_unreadable_destination_is_refused() {
    for authority in [
        "",
        ":80",
        "127.0.0.1:",
        "127.0.0.1:99999",
        "127.0.0.1:http",
        "[::1",
        "::1]",
        "[::1]x",
        "[fe80::1%25eth0]:80",
        "user@127.0.0.1",
        "127.0.0.1 foo",
        "127%2e0%2e0%2e1",
        "local host",
        "-bad-.example",
        "a..b",
        "\u{1F600}.example",
    ] {
        assert_eq!(
            check_authority(authority.as_bytes()),
            Err(LocalRefusal::Unreadable {
                authority: authority.to_owned()
            }),
            "{authority:?}"
        );
    }
    assert!(matches!(
        check_authority(b"\xff\xfe"),
        Err(LocalRefusal::Unreadable { .. })
    ));
}

/// Every row but the bare-`0x` ones was checked against glibc 2.36's
/// `inet_aton` (through Python's `socket.inet_aton`); glibc refuses `0x`,
/// older C libraries read it as 0, and so does the classifier.
#[test]
fn inet_aton_reads_as_glibc_does() {
    let cases: &[(&str, Option<[u8; 4]>)] = &[
        ("1.2.3.4", Some([1, 2, 3, 4])),
        ("1.2.3", Some([1, 2, 0, 3])),
        ("1.2.65535", Some([1, 2, 255, 255])),
        ("1.16777215", Some([1, 255, 255, 255])),
        ("4294967295", Some([255, 255, 255, 255])),
        ("0xffffffff", Some([255, 255, 255, 255])),
        ("037777777777", Some([255, 255, 255, 255])),
        ("0x.0x.0x.0x", Some([0, 0, 0, 0])),
        ("010.0.0.1", Some([8, 0, 0, 1])),
        ("1.2.3.256", None),
        ("1.2.65536", None),
        ("256.1", None),
        ("09", None),
        ("1..2", None),
        ("1.2.3.", None),
        (".1", None),
        ("", None),
        ("+1", None),
        ("-1", None),
        ("0x1g", None),
        ("a", None),
    ];
    for (text, expected) in cases {
        assert_eq!(inet_aton(text), expected.map(Ipv4Addr::from), "{text:?}");
    }
}

#[test]
fn the_reason_names_the_destination_and_the_flag() {
    let refusal = check_authority(b"127.0.0.1:9901").unwrap_err();
    let reason = refusal.to_string();
    assert!(reason.contains("\"127.0.0.1:9901\""), "{reason}");
    assert!(reason.contains("loopback"), "{reason}");
    assert!(reason.contains("--allow-local-destinations"), "{reason}");
    let unreadable = check_authority(b"a b").unwrap_err().to_string();
    assert!(unreadable.contains("\"a b\""), "{unreadable}");
}

#[test]
fn a_long_or_hostile_authority_is_shortened_and_escaped() {
    let long = format!("{}.localhost", "a".repeat(1000));
    let Err(LocalRefusal::Unreadable { authority }) = check_authority(long.as_bytes()) else {
        panic!("a 1000-byte label is not a host name");
    };
    assert_eq!(authority.len(), MAX_SHOWN);
    let multibyte = "é".repeat(200);
    let Err(LocalRefusal::Unreadable { authority }) = check_authority(multibyte.as_bytes()) else {
        panic!()
    };
    assert!(authority.len() <= MAX_SHOWN && authority.chars().all(|c| c == 'é'));
    let reason = check_authority(b"a\nb").unwrap_err().to_string();
    assert!(
        !reason.contains('\n'),
        "control characters are escaped: {reason}"
    );
}

#[test]
fn the_flag_turns_refusal_off() {
    assert_eq!(LocalDestinations::default(), LocalDestinations::Refuse);
    assert_eq!(
        LocalDestinations::from_flag(false),
        LocalDestinations::Refuse
    );
    assert_eq!(LocalDestinations::from_flag(true), LocalDestinations::Allow);
}
