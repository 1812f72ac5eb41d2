//! Fields of an encoded `istio.security.Authorization` that this build's proto does not define.
//!
//! prost skips unknown fields while decoding. For most resources that is forward compatibility,
//! but a policy is different: a `Match` whose only condition is a field added by a newer control
//! plane would decode as an empty `Match`, and a policy that meant to allow a few callers could
//! end up allowing or denying on less than it says. So an Authorization carrying any field ztunnel
//! does not know is refused, and enforced as a deny-all (`validate::authorization_or_deny_all`).
//!
//! The schema below mirrors `proto/istio/security/authorization.proto`. The tests build a policy
//! that sets every field without `..Default::default()`, so a field added to the proto stops them
//! compiling until it is set there, and then fails them until it is added here.

/// The messages an Authorization is built from.
#[derive(Clone, Copy)]
enum Message {
    Authorization,
    Rule,
    Clause,
    Match,
    Address,
    StringMatch,
    Empty,
}

#[derive(Clone, Copy)]
enum Kind {
    Scalar,
    One(Message),
    Repeated(Message),
}

impl Message {
    /// `(field number, name, kind)` of every field the message defines.
    fn fields(self) -> &'static [(u64, &'static str, Kind)] {
        use Kind::*;
        match self {
            Message::Authorization => &[
                (1, "name", Scalar),
                (2, "namespace", Scalar),
                (3, "scope", Scalar),
                (4, "action", Scalar),
                (5, "rules", Repeated(Message::Rule)),
            ],
            Message::Rule => &[(1, "clauses", Repeated(Message::Clause))],
            Message::Clause => &[(2, "matches", Repeated(Message::Match))],
            Message::Match => &[
                (1, "namespaces", Repeated(Message::StringMatch)),
                (2, "not_namespaces", Repeated(Message::StringMatch)),
                (3, "principals", Repeated(Message::StringMatch)),
                (4, "not_principals", Repeated(Message::StringMatch)),
                (5, "source_ips", Repeated(Message::Address)),
                (6, "not_source_ips", Repeated(Message::Address)),
                (7, "destination_ips", Repeated(Message::Address)),
                (8, "not_destination_ips", Repeated(Message::Address)),
                (9, "destination_ports", Scalar),
                (10, "not_destination_ports", Scalar),
            ],
            Message::Address => &[(1, "address", Scalar), (2, "length", Scalar)],
            Message::StringMatch => &[
                (1, "exact", Scalar),
                (2, "prefix", Scalar),
                (3, "suffix", Scalar),
                (4, "presence", One(Message::Empty)),
            ],
            Message::Empty => &[],
        }
    }
}

/// `Err` names the first field in `bytes` (an encoded Authorization) that ztunnel does not know,
/// by its path, for example `rules[0].clauses[1].matches[0] has field 11`.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    walk(Message::Authorization, bytes, "")
}

fn walk(msg: Message, mut buf: &[u8], path: &str) -> Result<(), String> {
    let here = |what: String| if path.is_empty() { what } else { format!("{path} {what}") };
    // Occurrences so far of each repeated field, to name the element.
    let mut seen = [0usize; 11];
    while !buf.is_empty() {
        let key = varint(&mut buf).ok_or_else(|| here("has a truncated field key".into()))?;
        let (number, wire_type) = (key >> 3, key & 7);
        let Some(&(_, name, kind)) = msg.fields().iter().find(|f| f.0 == number) else {
            return Err(here(format!("has field {number}, which this ztunnel does not know")));
        };
        let value = skip(&mut buf, wire_type).ok_or_else(|| here(format!("has a malformed {name}")))?;
        let sub = |name: String| if path.is_empty() { name } else { format!("{path}.{name}") };
        match (kind, value) {
            (Kind::Scalar, _) => {}
            (Kind::One(m), Some(v)) => walk(m, v, &sub(name.to_string()))?,
            (Kind::Repeated(m), Some(v)) => {
                // Field numbers here are at most 10.
                let i = &mut seen[number as usize];
                walk(m, v, &sub(format!("{name}[{i}]")))?;
                *i += 1;
            }
            (_, None) => return Err(here(format!("has {name} encoded as something other than a message"))),
        }
    }
    Ok(())
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (v, rest) = buf.split_at(n);
    *buf = rest;
    Some(v)
}

/// Moves past one field value of `wire_type`. `Some(Some(bytes))` for a length-delimited value,
/// `Some(None)` for the others, `None` if malformed or a group (proto3 has none).
fn skip<'a>(buf: &mut &'a [u8], wire_type: u64) -> Option<Option<&'a [u8]>> {
    match wire_type {
        0 => varint(buf).map(|_| None),
        1 => take(buf, 8).map(|_| None),
        2 => {
            let n = usize::try_from(varint(buf)?).ok()?;
            take(buf, n).map(Some)
        }
        5 => take(buf, 4).map(|_| None),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use trellis_proto::istio::security::{
        string_match::MatchType, Action, Address, Authorization, Clause, Match, Rule, Scope, StringMatch,
    };

    use super::check;

    fn sm(t: MatchType) -> StringMatch {
        StringMatch { match_type: Some(t) }
    }

    /// Every field of every message set, so each is encoded.
    fn full() -> Authorization {
        let cidr = || vec![Address { address: vec![10, 0, 0, 0], length: 8 }];
        let strings = || vec![sm(MatchType::Exact("a".into())), sm(MatchType::Prefix("b".into()))];
        let m = Match {
            namespaces: strings(),
            not_namespaces: vec![sm(MatchType::Suffix("c".into()))],
            principals: vec![sm(MatchType::Presence(()))],
            not_principals: strings(),
            source_ips: cidr(),
            not_source_ips: cidr(),
            destination_ips: cidr(),
            not_destination_ips: cidr(),
            destination_ports: vec![80, 443],
            not_destination_ports: vec![22],
        };
        Authorization {
            name: "p".into(),
            namespace: "demo".into(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            rules: vec![Rule { clauses: vec![Clause { matches: vec![Match::default(), m] }] }; 2],
        }
    }

    /// A length-delimited field `number` (< 16) holding `inner` (< 128 bytes).
    fn nested(number: u8, inner: &[u8]) -> Vec<u8> {
        assert!(number < 16 && inner.len() < 128);
        [&[number << 3 | 2, inner.len() as u8][..], inner].concat()
    }

    #[test]
    fn every_field_of_the_proto_is_known() {
        assert_eq!(check(&full().encode_to_vec()), Ok(()));
        assert_eq!(check(&[]), Ok(()));
    }

    #[test]
    fn an_unknown_field_is_named_by_its_path_at_any_depth() {
        // A varint field 11 (key 0x58) inside the second rule's match, as a newer proto might add.
        let mut m = Match { principals: vec![sm(MatchType::Exact("x".into()))], ..Default::default() }.encode_to_vec();
        m.extend([0x58, 0x01]);
        let mut body =
            Authorization { name: "p".into(), rules: vec![Rule::default()], ..Default::default() }.encode_to_vec();
        body.extend(nested(5, &nested(1, &nested(2, &m))));
        // prost decodes it, silently without the field.
        let decoded = Authorization::decode(body.as_slice()).unwrap();
        assert_eq!(decoded.rules[1].clauses[0].matches[0].principals.len(), 1);
        assert_eq!(
            check(&body),
            Err("rules[1].clauses[0].matches[0] has field 11, which this ztunnel does not know".into())
        );

        let mut top = full().encode_to_vec();
        top.extend(nested(6, b"dry-run?"));
        assert_eq!(check(&top), Err("has field 6, which this ztunnel does not know".into()));

        let presence = nested(4, &[0x08, 0x01]);
        let body = nested(5, &nested(1, &nested(2, &nested(3, &presence))));
        assert_eq!(
            check(&body),
            Err("rules[0].clauses[0].matches[0].principals[0].presence has field 1, which this ztunnel does not know"
                .into())
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [&[0x80][..], &[0x2a, 0x05, 0x01], &[0x2a, 0xff], &[0x0b], &[0x28, 0x01]] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }
}
