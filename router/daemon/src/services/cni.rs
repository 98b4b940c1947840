//! CNI attachments as the router keeps them: each is an IPAM allocation (and DNS names) under the
//! ID `cni:NETWORK:CONTAINERID:IFNAME`, so that one network's garbage collection never touches
//! another's and two interfaces of one container are two attachments. The attachments carry no
//! namespace reference: their life is the runtime's (DEL, GC), never the router's clean-up of
//! gone namespaces. The API side is `crate::api::cni`.

/// The IPAM ID prefix of every CNI attachment.
pub const ID_PREFIX: &str = "cni:";

/// `cni:NETWORK:CONTAINERID:IFNAME`.
pub fn attachment_id(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{ID_PREFIX}{network}:{container_id}:{ifname}")
}

/// (network, container ID, interface) of an attachment ID.
pub fn parse_attachment_id(id: &str) -> Option<(&str, &str, &str)> {
    let rest = id.strip_prefix(ID_PREFIX)?;
    let (network, rest) = rest.split_once(':')?;
    let (container, ifname) = rest.rsplit_once(':')?;
    Some((network, container, ifname))
}

/// The CNI spec's rule for network names and container IDs: letters, digits,
/// `_`, `.` and `-`, starting with a letter or digit.
pub fn is_valid_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        let id = attachment_id("weft", "abc123", "eth0");
        assert_eq!(id, "cni:weft:abc123:eth0");
        assert_eq!(parse_attachment_id(&id), Some(("weft", "abc123", "eth0")));
        assert_eq!(parse_attachment_id("netns:123"), None);
        assert_eq!(parse_attachment_id("cni:weft"), None);
    }

    #[test]
    fn spec_names_only() {
        assert!(is_valid_name("a-b_c.d9"));
        for bad in ["", "-a", "a b", "a:b", "a/b", "ä"] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }
}
