# -*- test-case-name: tests.test_events -*-
"""A tiny GeoIP2-City-shaped .mmdb, written at test time with mmdb-writer.

Only documentation ranges (RFC 5737 / RFC 3849) are in it, so nothing a test
looks up can be confused with a real address. The records have the nesting
MaxMind's City databases use (country.iso_code, subdivisions[].iso_code,
city.names.en, location, postal.code), which is what GeoLookup reads.
"""

from __future__ import annotations

from typing import Any

from mmdb_writer import MmdbF64, MmdbU32, MMDBWriter
from netaddr import IPSet

#: A US address with full city data (ZIP code → SparkPost ``zip``).
US_IP = "203.0.113.7"
US_NET = "203.0.113.0/24"
US_GEO: dict[str, Any] = {
    "country": "US",
    "region": "MD",
    "city": "Columbia",
    "latitude": 39.1749,
    "longitude": -76.8375,
    "postal_code": "21046",
    "zip": 21046,
}

#: An IPv6 address in Germany: a non-ASCII city name, and a postcode that is not a
#: US ZIP code (so no ``zip``).
DE_IP = "2001:db8::1"
DE_NET = "2001:db8::/32"
DE_GEO: dict[str, Any] = {
    "country": "DE",
    "region": "BY",
    "city": "München",
    "latitude": 48.1374,
    "longitude": 11.5755,
    "postal_code": "80331",
}

#: Country only (as GeoLite2 has for much of the world): no city, no location.
COUNTRY_ONLY_IP = "198.51.100.20"
COUNTRY_ONLY_NET = "198.51.100.0/24"
COUNTRY_ONLY_GEO: dict[str, Any] = {"country": "GB"}

#: In a documentation range but absent from the database.
UNKNOWN_IP = "192.0.2.1"


def _city_record(geo: dict[str, Any], geoname_id: int, city_de: str) -> dict[str, Any]:
    """A record shaped like GeoIP2-City's (trimmed to what we read, plus a little)."""
    record: dict[str, Any] = {
        "continent": {"code": "NA" if geo["country"] == "US" else "EU"},
        "country": {"iso_code": geo["country"], "names": {"en": geo["country"]}},
        "registered_country": {"iso_code": geo["country"]},
    }
    if "city" in geo:
        record["city"] = {
            "geoname_id": MmdbU32(geoname_id),
            "names": {"en": geo["city"], "de": city_de},
        }
        record["subdivisions"] = [{"iso_code": geo["region"], "names": {"en": geo["region"]}}]
        record["location"] = {
            "latitude": MmdbF64(geo["latitude"]),
            "longitude": MmdbF64(geo["longitude"]),
            "accuracy_radius": MmdbU32(20),
            "time_zone": "America/New_York" if geo["country"] == "US" else "Europe/Berlin",
        }
        record["postal"] = {"code": geo["postal_code"]}
    return record


def write_city_mmdb(path: str) -> str:
    """Write the test database to ``path`` (IPv6 tree, IPv4 mapped in) and return it."""
    writer = MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,
        database_type="GeoIP2-City",
        languages=["en", "de"],
        description="sparkytwist test City database (documentation ranges only)",
    )
    writer.insert_network(IPSet([US_NET]), _city_record(US_GEO, 4352539, "Columbia"))
    writer.insert_network(IPSet([DE_NET]), _city_record(DE_GEO, 2867714, "München"))
    writer.insert_network(IPSet([COUNTRY_ONLY_NET]), _city_record(COUNTRY_ONLY_GEO, 0, ""))
    writer.to_db_file(path)
    return path
