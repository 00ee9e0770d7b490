//! Closed sets of names a setting takes (`lr_scheduler_type = "cosine"`): enums that parse from TOML, JSON and
//! flags alike, and whose errors name the key and every allowed value.

/// Declares `enum $name` whose variants are written as `$text` (and read from `$text` or an alias), with
/// `FromStr` (flags), serde (TOML and JSON files) and `Display`. An unknown name is an error naming `$key`
/// and the allowed values.
#[macro_export]
macro_rules! choice {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident for $key:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal $(| $alias:literal)* ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// The names written for the variants, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text ),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $( $text $(| $alias)* => Ok($name::$variant), )+
                    other => Err(format!(
                        "{} `{other}`: expected one of {}",
                        $key,
                        Self::NAMES.join(", ")
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = <String as ::serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(::serde::de::Error::custom)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::choice! {
        enum Fruit for "fruit" {
            Apple = "apple" | "apples",
            Pear = "pear",
        }
    }

    #[test]
    fn names_parse_and_print_and_errors_list_the_choices() {
        assert_eq!("apples".parse::<Fruit>(), Ok(Fruit::Apple));
        assert_eq!(Fruit::Pear.to_string(), "pear");
        let e = "plum".parse::<Fruit>().unwrap_err();
        assert_eq!(e, "fruit `plum`: expected one of apple, pear");
        let f: Fruit = serde_json::from_str("\"pear\"").unwrap();
        assert_eq!(serde_json::to_string(&f).unwrap(), "\"pear\"");
        let e = serde_json::from_str::<Fruit>("\"fig\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fruit `fig`") && e.contains("apple, pear"),
            "{e}"
        );
    }
}
