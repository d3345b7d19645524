//! Property tests (proptest) for the local-destination check.
//! `PROPTEST_CASES=N` runs longer (README.md, "Fuzzing"); failures are
//! kept in `proptest-regressions/local/fuzz.txt`.

use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;

proptest! {
    /// Any bytes: no panic; a refusal quotes at most `MAX_SHOWN` bytes.
    #[test]
    fn any_authority_is_classified(authority in proptest::collection::vec(any::<u8>(), 0..300)) {
        match check_authority(&authority) {
            Ok(()) => {
                let text = std::str::from_utf8(&authority).expect("a readable host is UTF-8");
                prop_assert!(Host::from_authority(text).is_some());
            }
            Err(LocalRefusal::Local { authority: shown, .. })
            | Err(LocalRefusal::Unreadable { authority: shown }) => {
                prop_assert!(shown.len() <= MAX_SHOWN);
            }
        }
    }

    /// Every loopback, unspecified and link-local address is refused, in
    /// every spelling: bare, bracketed, with a port, IPv4-mapped, and as
    /// a name the resolver reads as that number.
    #[test]
    fn local_addresses_are_refused(
        low in any::<[u8; 3]>(),
        first in prop_oneof![Just(127u8), Just(0u8)],
        port in proptest::option::of(any::<u16>()),
        link in any::<[u8; 2]>(),
    ) {
        let port = port.map(|p| format!(":{p}")).unwrap_or_default();
        let v4 = Ipv4Addr::new(first, low[0], low[1], low[2]);
        let link_local = Ipv4Addr::new(169, 254, link[0], link[1]);
        let mapped = v4.to_ipv6_mapped();
        let spellings = [
            format!("{v4}{port}"),
            format!("{link_local}{port}"),
            format!("[{mapped}]{port}"),
            format!("[::1]{port}"),
            format!("[{}]{port}", Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, u16::from(link[0]))),
            format!("{}{port}", u32::from(v4)),
            format!("localhost{port}"),
            format!("LOCALHOST.{port}"),
            format!("x{}.localhost{port}", low[0]),
        ];
        for spelling in spellings {
            prop_assert!(check_authority(spelling.as_bytes()).is_err(), "{} passed", spelling);
        }
    }
}
