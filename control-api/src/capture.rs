//! The capture settings of a pod: which ports and destinations its init container redirects through
//! the sidecar. Parsed here once, for the injector (from a pod's annotations, so a bad value is
//! refused at injection, naming the annotation) and for `remora init` (from its flags).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A set of ports: all, or a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    /// Every port.
    All,
    /// These ports.
    List(Vec<u16>),
}

/// A set of destinations: all, or a list of CIDRs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cidrs {
    /// Every address.
    All,
    /// These ranges.
    List(Vec<Cidr>),
}

/// An address range: `10.0.0.0/8`, `fd00::/64`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub address: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

/// A capture setting that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(String);

impl FromStr for Cidr {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Cidr, ParseError> {
        let (address, prefix) = text.split_once('/').map_or((text, None), |(a, p)| (a, Some(p)));
        let address: IpAddr =
            address.trim().parse().map_err(|_| ParseError(format!("{text:?} is not an IP address or CIDR")))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| ParseError(format!("{text:?}: the prefix length must be 0 to {max}")))?,
        };
        Ok(Cidr { address, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// Parses a comma-separated port list; empty text is an empty list.
pub fn parse_ports(text: &str) -> Result<Vec<u16>, ParseError> {
    split(text)
        .map(|p| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| ParseError(format!("{p:?} is not a port"))))
        .collect()
}

/// Parses `*` or a comma-separated port list.
pub fn parse_port_set(text: &str) -> Result<Ports, ParseError> {
    if text.trim() == "*" { Ok(Ports::All) } else { parse_ports(text).map(Ports::List) }
}

/// Parses a comma-separated CIDR list.
pub fn parse_cidrs(text: &str) -> Result<Vec<Cidr>, ParseError> {
    split(text).map(str::parse).collect()
}

/// Parses `*` or a comma-separated CIDR list.
pub fn parse_cidr_set(text: &str) -> Result<Cidrs, ParseError> {
    if text.trim() == "*" { Ok(Cidrs::All) } else { parse_cidrs(text).map(Cidrs::List) }
}

fn split(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn bad_settings_are_refused_naming_the_value() {
        assert_eq!(parse_ports("80,http").unwrap_err().to_string(), "\"http\" is not a port");
        assert_eq!(parse_ports("0").unwrap_err().to_string(), "\"0\" is not a port");
        assert_eq!(
            parse_cidrs("10.0.0.0/33").unwrap_err().to_string(),
            "\"10.0.0.0/33\": the prefix length must be 0 to 32"
        );
        assert!(parse_cidrs("example.com").unwrap_err().to_string().contains("not an IP address"));
        assert_eq!(parse_ports(" ").unwrap(), Vec::<u16>::new());
        assert_eq!(parse_port_set(" * ").unwrap(), Ports::All);
        assert_eq!(parse_cidrs("10.1.2.3").unwrap()[0].to_string(), "10.1.2.3/32");
    }
}
